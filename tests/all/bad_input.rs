//! Bad requests get a 4xx that names what was wrong, and write nothing.

use serde_json::{json, Value};

use crate::support::{eventually, on_both_stores, plugin_set, Api, Server};

async fn head(api: &Api) -> Value {
    api.projection("account-balance").await["head"].clone()
}

on_both_stores! {
    async fn bad_appends_are_refused_with_the_reason_and_write_nothing(backend) {
        let server = Server::on(&backend, &plugin_set(&["account-balance"], &[]));
        let api = server.api();
        api.open_account("acct-1", "a").await;

        let cases: Vec<(&str, String, u16, &str, &str)> = vec![
            ("malformed JSON", "{\"stream\": ".into(), 400, "malformed_json", "parse"),
            ("missing field", json!({"stream": "s", "type": "T", "payload": {}}).to_string(), 400, "invalid_event", "stream_type"),
            ("wrong type", json!({"stream": "s", "stream_type": "S", "type": "T", "payload": {}, "expected_version": "one"}).to_string(), 400, "invalid_event", "expected_version"),
            ("unknown field", json!({"stream": "s", "stream_type": "S", "type": "T", "payload": {}, "colour": 1}).to_string(), 400, "invalid_event", "colour"),
            ("empty stream", json!({"stream": "", "stream_type": "S", "type": "T", "payload": {}}).to_string(), 400, "invalid_event", "stream"),
            ("bad id", json!({"id": "42", "stream": "s", "stream_type": "S", "type": "T", "payload": {}}).to_string(), 400, "invalid_event", "UUID"),
            ("not an object", "[1, 2]".into(), 400, "invalid_event", "event object"),
            ("empty batch", json!({"events": []}).to_string(), 400, "invalid_event", "no events"),
            ("bad event in a batch", json!({"events": [
                {"stream": "s", "stream_type": "S", "type": "T", "payload": {}},
                {"stream": "s", "stream_type": "S", "payload": {}}]}).to_string(), 400, "invalid_event", "events[1]"),
            ("NUL escape", r#"{"stream": "s", "stream_type": "S", "type": "T", "payload": {"a": "x\u0000"}}"#.into(), 400, "invalid_event", "NUL"),
            ("half a surrogate pair", r#"{"stream": "s", "stream_type": "S", "type": "T", "payload": {"a": "cut \ud83d"}}"#.into(), 400, "invalid_event", "payload.a"),
            ("oversized body", format!("{{\"stream\":\"s\",\"stream_type\":\"S\",\"type\":\"T\",\"payload\":\"{}\"}}", "x".repeat(2 << 20)), 413, "body_too_large", "length limit"),
        ];
        for (what, body, status, code, mention) in cases {
            let (got, reply) = api.post_raw("/events", &body).await;
            assert_eq!(got, status, "{what}: {reply}");
            assert_eq!(reply["error"]["code"], code, "{what}: {reply}");
            let message = reply["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(mention),
                "{what}: {message:?} should mention {mention:?}"
            );
        }
        // The server answers an oversized body before reading it and closes that connection;
        // a new client avoids reusing it.
        let api = server.api();
        // Every refused request named stream "s": had one written anything, this would not
        // be its first version.
        let (version, position) = api.append("s", "T", json!({})).await;
        assert_eq!(version, 1, "a refused request wrote something");
        let (status, body) = api
            .get(&format!("/projections/account-balance/_streams/s?min_position={position}"))
            .await;
        assert_eq!(status, 200, "{body}");
        // The head may trail the checkpoint for a moment on PostgreSQL (it is re-read on a
        // notification): wait for it to reach the append, then check nothing came after.
        eventually(std::time::Duration::from_secs(10), || async {
            match head(&api).await.as_u64().unwrap_or(0) >= position {
                true => Ok(()),
                false => Err(format!("the head never reached {position}")),
            }
        })
        .await;
        assert_eq!(head(&api).await, position, "nothing after it either");

        // A duplicate id is a conflict.
        let id = uuid::Uuid::new_v4().to_string();
        let event = json!({"id": id, "stream": "s", "stream_type": "S", "type": "T", "payload": {}});
        assert_eq!(api.post("/events", &event).await.0, 201);
        let (status, reply) = api.post("/events", &event).await;
        assert_eq!(status, 409, "{reply}");
        assert_eq!(reply["error"]["code"], "duplicate_id");
    }
}

on_both_stores! {
    async fn bad_reads_name_what_was_wrong(backend) {
        let server = Server::on(&backend, &plugin_set(&["account-balance"], &[]));
        let api = server.api();
        let cases = [
            ("/projections/nope", 404, "unknown_projection"),
            ("/projections/nope/accounts/a", 404, "unknown_projection"),
            (
                "/projections/account-balance/cards/a",
                404,
                "unknown_collection",
            ),
            (
                "/projections/account-balance/accounts/missing",
                404,
                "not_found",
            ),
            (
                "/projections/account-balance/accounts/a?wait_for=acct-1",
                400,
                "invalid_parameter",
            ),
            (
                "/projections/account-balance/accounts/a?wait_for=acct-1@x",
                400,
                "invalid_parameter",
            ),
            (
                "/projections/account-balance/accounts/a?min_position=-1",
                400,
                "invalid_parameter",
            ),
            (
                "/projections/account-balance/accounts/a?colour=red",
                400,
                "invalid_parameter",
            ),
            (
                "/projections/account-balance/accounts?balance=1",
                400,
                "invalid_filter",
            ),
            (
                "/projections/account-balance/accounts?limit=0",
                400,
                "invalid_parameter",
            ),
            (
                "/projections/account-balance/accounts?limit=100000",
                400,
                "invalid_parameter",
            ),
            (
                "/projections/account-balance/accounts/a?min_position=99&timeout_ms=50",
                504,
                "wait_timeout",
            ),
            ("/nowhere", 404, "no_route"),
        ];
        for (path, status, code) in cases {
            let (got, body) = api.get(path).await;
            assert_eq!(got, status, "{path}: {body}");
            assert_eq!(body["error"]["code"], code, "{path}: {body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{path}: {body}"
            );
        }
        let (_, body) = api
            .get("/projections/account-balance/accounts/a?min_position=99&timeout_ms=50")
            .await;
        assert_eq!(body["error"]["target"], 99);
        assert_eq!(body["error"]["position"], 0);
    }
}
