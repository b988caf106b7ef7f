//! The embedded pipeline end to end: the real binary, real plugins, SQLite.

use serde_json::{json, Value};

use crate::support::{on_both_stores, plugin_set, tempdir, Api, Backend, Server};

on_both_stores! {
    async fn a_read_with_wait_for_sees_the_append_it_names(backend) {
        let server = Server::on(&backend, &plugin_set(&["account-balance"], &[]));
        let api = server.api();
        api.open_account("acct-1", "alice").await;
        let (version, _) = api
            .append("acct-1", "Deposited", json!({"amount": 25}))
            .await;
        let (status, body) = api
            .get(&format!(
                "/projections/account-balance/accounts/acct-1?wait_for=acct-1@{version}"
            ))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["document"]["balance"], 25);
        assert_eq!(body["document"]["last_version"], version);
        assert!(body["position"].as_u64().unwrap() >= 2);
    }
}

on_both_stores! {
    async fn min_position_waits_for_the_position_returned_by_the_append(backend) {
        let server = Server::on(&backend, &plugin_set(&["account-balance"], &[]));
        let api = server.api();
        let (_, position) = api
            .append(
                "acct-9",
                "AccountOpened",
                json!({"owner": "zoe", "currency": "USD"}),
            )
            .await;
        let (status, body) = api
            .get(&format!(
                "/projections/account-balance/accounts/acct-9?min_position={position}"
            ))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["document"]["owner"], "zoe");
    }
}

on_both_stores! {
    async fn per_stream_order_holds_across_concurrent_appends_to_50_streams(backend) {
        let server = Server::on(&backend, &plugin_set(&[], &["misbehave"]));
        let api = server.api();
        let writers: Vec<_> = (0..50)
            .map(|s| {
                let api = api.clone();
                tokio::spawn(async move {
                    let stream = format!("stream-{s}");
                    for v in 0..20u64 {
                        let (status, body) = api
                            .post(
                                "/events",
                                &json!({"stream": stream, "stream_type": "T", "type": "Seq",
                                        "payload": {"n": v}, "expected_version": v}),
                            )
                            .await;
                        assert_eq!(status, 201, "{body}");
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        for s in 0..50 {
            let (status, body) = api
                .get(&format!(
                    "/projections/misbehave/out/seq-stream-{s}?wait_for=stream-{s}@20"
                ))
                .await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["document"], json!({"count": 20, "last_version": 20}));
        }
        let projection = api.projection("misbehave").await;
        assert_eq!(projection["status"], "running", "{projection}");
    }
}

on_both_stores! {
    /// Appends without `expected_version` never fail for racing each other: each gets the
    /// next version, and the stream is applied in that order.
    async fn racing_appends_to_one_stream_all_land_in_order(backend) {
        let server = Server::on(&backend, &plugin_set(&[], &["misbehave"]));
        let api = server.api();
        let writers: Vec<_> = (0..10)
            .map(|_| {
                let api = api.clone();
                tokio::spawn(async move {
                    for _ in 0..20 {
                        let (status, body) = api
                            .post("/events", &json!({"stream": "hot", "stream_type": "T", "type": "Seq", "payload": {}}))
                            .await;
                        assert_eq!(status, 201, "{body}");
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        let (status, body) = api
            .get("/projections/misbehave/out/seq-hot?wait_for=hot@200")
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["document"], json!({"count": 200, "last_version": 200}));

        // Requests touching the same two streams in opposite orders (a transfer each way)
        // must not deadlock each other into errors.
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let api = api.clone();
                tokio::spawn(async move {
                    let (a, b) = if w % 2 == 0 { ("x", "y") } else { ("y", "x") };
                    for _ in 0..15 {
                        let event = |s: &str| json!({"stream": s, "stream_type": "T", "type": "Seq", "payload": {}});
                        let (status, body) = api
                            .post("/events", &json!({"events": [event(a), event(b)]}))
                            .await;
                        assert_eq!(status, 201, "{body}");
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        for stream in ["x", "y"] {
            let (status, body) = api
                .get(&format!("/projections/misbehave/out/seq-{stream}?wait_for={stream}@120"))
                .await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["document"], json!({"count": 120, "last_version": 120}));
        }
    }
}

on_both_stores! {
    async fn a_stale_expected_version_is_a_conflict_that_writes_nothing(backend) {
        let server = Server::on(&backend, &plugin_set(&["account-balance"], &[]));
        let api = server.api();
        api.open_account("acct-1", "a").await;
        // The first event is fine on its own; the second's expectation is stale, so neither lands.
        let (status, body) = api
            .post(
                "/events",
                &json!({"events": [
                    {"stream": "acct-2", "stream_type": "Account", "type": "AccountOpened",
                     "payload": {"owner": "b", "currency": "EUR"}, "expected_version": 0},
                    {"stream": "acct-1", "stream_type": "Account", "type": "Deposited",
                     "payload": {"amount": 5}, "expected_version": 0},
                ]}),
            )
            .await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "version_conflict");
        assert_eq!(body["error"]["current_version"], 1);
        assert_eq!(body["error"]["stream"], "acct-1");
        // Nothing of the request landed: acct-1 is still at version 1...
        let (version, _) = api.append("acct-1", "Deposited", json!({"amount": 1})).await;
        assert_eq!(version, 2);
        // ...and acct-2 does not exist: expecting version 0 still succeeds.
        let (status, body) = api
            .post(
                "/events",
                &json!({"stream": "acct-2", "stream_type": "Account", "type": "AccountOpened",
                        "payload": {"owner": "b", "currency": "EUR"}, "expected_version": 0}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["events"][0]["version"], 1);
    }
}

on_both_stores! {
    async fn lists_filter_on_indexed_fields_and_paginate_with_a_cursor(backend) {
        let server = Server::on(&backend, &plugin_set(&["account-balance"], &[]));
        let api = server.api();
        let mut last = 0;
        for i in 0..7 {
            let owner = if i % 2 == 0 { "even" } else { "odd" };
            (_, last) = api.open_account(&format!("acct-{i}"), owner).await;
        }
        let mut keys = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path =
                format!("/projections/account-balance/accounts?owner=even&limit=2&min_position={last}");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let (status, body) = api.get(&path).await;
            assert_eq!(status, 200, "{body}");
            for item in body["items"].as_array().unwrap() {
                assert_eq!(item["document"]["owner"], "even");
                keys.push(item["key"].as_str().unwrap().to_owned());
            }
            match body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        assert_eq!(keys, ["acct-0", "acct-2", "acct-4", "acct-6"]);
    }
}

on_both_stores! {
    /// With `on_error = "stop"`, today's behaviour before isolation: the failing projection
    /// stops, the others go on.
    async fn a_failing_plugin_stops_only_its_own_projection(backend) {
        let server = Server::start_on(
            &backend,
            &plugin_set(&["account-balance"], &["misbehave"]),
            &tempdir("data"),
            &[("PROJECTOR_RUNNER__ON_ERROR", "stop")],
        );
        let api = server.api();
        let (_, boom) = api.append("poison", "Panic", json!({})).await;
        api.open_account("acct-1", "a").await;

        // The healthy projection goes on past the poison event.
        let (status, body) = api
            .get("/projections/account-balance/accounts/acct-1?wait_for=acct-1@1")
            .await;
        assert_eq!(status, 200, "{body}");

        // The failing one reports why and where, and waiting on it answers at once.
        let (status, body) = api
            .get(&format!(
                "/projections/misbehave/out/x?min_position={boom}&timeout_ms=30000"
            ))
            .await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "projection_failed");
        let misbehave = api.projection("misbehave").await;
        assert_eq!(misbehave["status"], "failed", "{misbehave}");
        let error = misbehave["error"].as_str().unwrap();
        assert!(error.contains("asked to panic"), "{error}");
        assert!(error.contains(&format!("position {boom}")), "{error}");
        assert_eq!(api.projection("account-balance").await["status"], "running");
        let (status, body) = api.get("/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.to_string().contains("misbehave"), "{body}");
        let (status, _) = api.get("/healthz").await;
        assert_eq!(status, 200);

        // Operators see how far behind each read model is, in time: the failed projection's
        // oldest unapplied event ages, the healthy one has applied everything it read.
        let lag = |text: &str, projection: &str| -> f64 {
            let prefix = format!("projector_lag_seconds{{projection=\"{projection}\"}} ");
            let line = text.lines().find(|l| l.starts_with(&prefix));
            line.and_then(|l| l[prefix.len()..].parse().ok())
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
        };
        let (_, first) = api.get("/metrics").await;
        let first = lag(first.as_str().unwrap(), "misbehave");
        let second = crate::support::eventually(std::time::Duration::from_secs(30), || {
            let api = api.clone();
            async move {
                let (_, text) = api.get("/metrics").await;
                let text = text.as_str().unwrap().to_owned();
                if lag(&text, "misbehave") >= first + 1.0 {
                    Ok(text)
                } else {
                    Err(format!("the failed projection's lag does not grow:\n{text}"))
                }
            }
        })
        .await;
        assert_eq!(lag(&second, "account-balance"), 0.0, "{second}");
    }
}

on_both_stores! {
    /// A paused projection reads nothing: its lag is still the age of the oldest event it has
    /// not applied, in the metric and in `GET /projections/{p}`, and 0 again once resumed.
    async fn a_paused_projections_lag_counts_the_events_it_has_not_read(backend) {
        use crate::isolation::{admin, TOKEN};
        let server = Server::start_on(
            &backend,
            &plugin_set(&["account-balance"], &[]),
            &tempdir("paused-lag"),
            &[("PROJECTOR_ADMIN__TOKEN", TOKEN)],
        );
        let api = server.api();
        let (version, _) = api.open_account("acct-1", "a").await;
        let (status, body) = api
            .get(&format!("/projections/account-balance/accounts/acct-1?wait_for=acct-1@{version}"))
            .await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = admin(&api, "/admin/projections/account-balance/pause").await;
        assert_eq!(status, 200, "{body}");
        let appended = std::time::Instant::now();
        api.append("acct-1", "Deposited", json!({"amount": 1})).await;
        let lags = |api: Api| async move {
            let (_, text) = api.get("/metrics").await;
            let text = text.as_str().unwrap().to_owned();
            let prefix = "projector_lag_seconds{projection=\"account-balance\"} ";
            let metric: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix(prefix))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
            let listed = api.projection("account-balance").await["lag_seconds"]
                .as_f64()
                .unwrap();
            (metric, listed)
        };
        // The deposit's age, as both report it: growing, and never more than the time since
        // it was appended.
        crate::support::eventually(std::time::Duration::from_secs(30), || {
            let api = api.clone();
            async move {
                let (metric, listed) = lags(api).await;
                let bound = appended.elapsed().as_secs_f64() + 0.01;
                assert!(metric <= bound && listed <= bound, "{metric} {listed} > {bound}");
                if metric >= 0.5 && listed >= 0.5 {
                    Ok(())
                } else {
                    Err(format!("paused with an event unread: lag {metric} s (metric), {listed} s (GET)"))
                }
            }
        })
        .await;
        let (status, body) = admin(&api, "/admin/projections/account-balance/resume").await;
        assert_eq!(status, 200, "{body}");
        crate::support::eventually(std::time::Duration::from_secs(30), || {
            let api = api.clone();
            async move {
                match lags(api).await {
                    (0.0, 0.0) => Ok(()),
                    other => Err(format!("resumed and caught up, yet lag {other:?}")),
                }
            }
        })
        .await;
    }
}

on_both_stores! {
    async fn events_a_projection_does_not_subscribe_to_still_move_its_checkpoint(backend) {
        let server = Server::on(&backend, &plugin_set(&["account-balance"], &[]));
        let api = server.api();
        let (_, position) = api.append("cart-1", "ItemAdded", json!({"sku": "x"})).await;
        let (status, body) = api
            .get(&format!(
                "/projections/account-balance/_streams/cart-1?min_position={position}"
            ))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["applied_version"], 1);
        let projection = api.projection("account-balance").await;
        assert_eq!(projection["checkpoint"], position);
        assert_eq!(projection["lag"], 0);
    }
}

on_both_stores! {
    async fn metrics_report_progress_per_projection(backend) {
        let server = Server::on(&backend, &plugin_set(&["account-balance"], &[]));
        let api = server.api();
        api.open_account("acct-1", "a").await;
        let (_, position) = api
            .append("acct-1", "Deposited", json!({"amount": 3}))
            .await;
        let (status, _) = api
            .get(&format!(
                "/projections/account-balance/accounts/acct-1?min_position={position}"
            ))
            .await;
        assert_eq!(status, 200);
        let (status, body) = api.get("/metrics").await;
        assert_eq!(status, 200);
        let text = body.as_str().expect("metrics are text");
        for line in [
            format!("projector_head_position {position}"),
            format!("projector_checkpoint_position{{projection=\"account-balance\"}} {position}"),
            "projector_lag_events{projection=\"account-balance\"} 0".to_owned(),
            "projector_lag_seconds{projection=\"account-balance\"} 0.000".to_owned(),
            "projector_projection_up{projection=\"account-balance\"} 1".to_owned(),
            "projector_events_total{projection=\"account-balance\"} 2".to_owned(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}

/// Another process writes a row the host cannot read into the outbox (a payload that is not
/// JSON on SQLite; a NULL payload on PostgreSQL, whose json column refuses bad JSON).
async fn write_malformed_row(
    backend: &Backend,
    server: &Server,
    n: u8,
    stream: &str,
    event_type: &str,
) {
    match backend {
        Backend::Sqlite => {
            let url = format!(
                "sqlite://{}",
                server.data_dir.join("projector.db").display()
            );
            let db = sqlx::SqlitePool::connect(&url).await.unwrap();
            sqlx::query(
                "INSERT INTO outbox (id, stream, stream_type, event_type, version, payload, headers, timestamp_ms) \
                 VALUES (?, ?, 'Account', ?, 1, '{oops', '[]', 0)",
            )
            .bind(format!("bad-{n}"))
            .bind(stream)
            .bind(event_type)
            .execute(&db)
            .await
            .unwrap();
            db.close().await;
        }
        Backend::Postgres { url } => {
            let sql = format!(
                "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, version) \
                 VALUES ('00000000-0000-4000-8000-0000000000b{n}', 'Account', '{stream}', '{event_type}', NULL, 1)"
            );
            let status = std::process::Command::new("psql")
                .args([url.as_str(), "-v", "ON_ERROR_STOP=1", "-qc", &sql])
                .status()
                .unwrap();
            assert!(status.success());
        }
    }
}

on_both_stores! {
    /// Invariant 4 for the source: a malformed row is dead-lettered with the reason, later
    /// events of its stream are parked behind it (across restarts), other streams go on.
    async fn a_malformed_row_is_dead_lettered_and_its_stream_parked(backend) {
        let data = crate::support::tempdir("malformed");
        let plugins = plugin_set(&["account-balance"], &[]);
        let mut server = Server::start_on(&backend, &plugins, &data, &[]);
        let api = server.api();
        api.open_account("acct-1", "a").await;
        write_malformed_row(&backend, &server, 1, "acct-2", "AccountOpened").await;
        // A malformed row of a type this projection does not take: passed by, nothing parked.
        write_malformed_row(&backend, &server, 2, "cart-9", "ItemAdded").await;
        let (v2, parked_1) = api.append("acct-2", "Deposited", json!({"amount": 5})).await;
        assert_eq!(v2, 2);
        let (v1, _) = api.append("acct-1", "Deposited", json!({"amount": 3})).await;
        let (status, body) = api
            .get(&format!("/projections/account-balance/accounts/acct-1?wait_for=acct-1@{v1}"))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["document"]["balance"], 3, "other streams go on");
        let projection = api.projection("account-balance").await;
        assert_eq!(projection["status"], "running", "{projection}");

        let (v, _) = api.open_account("cart-9", "c").await;
        let (status, body) = api
            .get(&format!("/projections/account-balance/accounts/cart-9?wait_for=cart-9@{v}"))
            .await;
        assert_eq!(status, 200, "cart-9 is not parked: {body}");

        let (status, body) = api.get("/projections/account-balance/_dead_letters").await;
        assert_eq!(status, 200, "{body}");
        let items = body["items"].as_array().unwrap();
        assert_eq!(items.len(), 2, "only the subscribed type's row and the one behind it: {body}");
        let first = &items[0];
        assert_eq!(first["stream"], "acct-2");
        assert!(first["reason"].as_str().unwrap().contains("malformed outbox row"), "{first}");
        let bad_id = match backend {
            Backend::Sqlite => "bad-1",
            Backend::Postgres { .. } => "00000000-0000-4000-8000-0000000000b1",
        };
        assert_eq!(first["event_id"], bad_id, "{first}");
        assert_eq!(first["parked_behind"], Value::Null);
        assert_eq!(items[1]["position"], parked_1);
        assert_eq!(items[1]["parked_behind"], first["position"]);
        let (status, _) = api.get("/projections/account-balance/accounts/acct-2").await;
        assert_eq!(status, 404, "nothing of the parked stream was applied");
        // A reader waiting for the parked deposit is told it will not be applied, and why.
        let (status, body) = api
            .get(&format!("/projections/account-balance/accounts/acct-1?wait_for=acct-2@{v2}"))
            .await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "dead_lettered", "{body}");
        assert_eq!(body["error"]["position"], parked_1, "{body}");
        assert!(body["error"]["reason"].as_str().unwrap().contains("parked behind"), "{body}");

        // Parking survives a restart.
        server.restart();
        let api = server.api();
        let (_, parked_2) = api.append("acct-2", "Deposited", json!({"amount": 1})).await;
        let (status, body) = api
            .get(&format!("/projections/account-balance/_streams/acct-2?min_position={parked_2}"))
            .await;
        assert_eq!(status, 200, "{body}");
        let (_, body) = api.get("/projections/account-balance/_dead_letters").await;
        let items = body["items"].as_array().unwrap();
        assert_eq!(items.len(), 3, "{body}");
        assert_eq!(items[2]["position"], parked_2);
        let (_, metrics) = api.get("/metrics").await;
        let metrics = metrics.as_str().unwrap();
        assert!(metrics.contains("projector_parked_streams{projection=\"account-balance\"} 1"), "{metrics}");
        assert!(metrics.contains("projector_parked_events{projection=\"account-balance\"} 2"), "{metrics}");
    }
}
