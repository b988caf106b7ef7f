//! A payload's text is kept exactly as appended, from the HTTP request to the outbox, to the
//! plugin and back out of the read model: no number is rounded, no zero loses its sign. A key
//! given twice is refused, naming it, since readers disagree on which one counts.

use crate::support::{on_both_stores, outbox_rows, plugin_set, Backend, Server};

/// Numbers a parse into `f64` would change: past u64, past f64's precision, a negative zero,
/// past f64's range.
const PAYLOAD: &str = r#"{"big":18446744073709551616,"exact":0.1000000000000000055511151231257827,"zero":-0,"huge":1e400,"money":[{"amount":12345678901234567890.01}]}"#;

async fn outbox_payloads(backend: &Backend, server: &Server) -> Vec<String> {
    outbox_rows(backend, &server.data_dir)
        .await
        .into_iter()
        .map(|row| row.payload)
        .collect()
}

on_both_stores! {
    async fn payload_numbers_are_kept_exactly(backend) {
        let server = Server::on(&backend, &plugin_set(&[], &["misbehave"]));
        let api = server.api();
        let body = format!(
            r#"{{"stream":"n-1","stream_type":"T","type":"Echo","payload":{PAYLOAD}}}"#
        );
        let (status, answer) = api.post_raw("/events", &body).await;
        assert_eq!(status, 201, "{answer}");

        assert_eq!(outbox_payloads(&backend, &server).await, vec![PAYLOAD.to_owned()]);

        // The plugin wrote the bytes it was handed as the document.
        let (status, text) = api
            .get_text("/projections/misbehave/out/n-1?wait_for=n-1@1")
            .await;
        assert_eq!(status, 200, "{text}");
        match backend {
            // SQLite keeps a document's text as written.
            Backend::Sqlite => assert!(
                text.contains(&format!(r#""document":{PAYLOAD}"#)),
                "{text}"
            ),
            // PostgreSQL keeps documents as jsonb: exact values, its own spacing, and a
            // numeric has no negative zero.
            Backend::Postgres { .. } => {
                for exact in [
                    "18446744073709551616",
                    "0.1000000000000000055511151231257827",
                    "12345678901234567890.01",
                ] {
                    assert!(text.contains(exact), "{exact} not in {text}");
                }
            }
        }

        // Listings carry the same text.
        let (status, text) = api.get_text("/projections/misbehave/out").await;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("18446744073709551616"), "{text}");
    }

    async fn a_key_given_twice_is_refused_by_name(backend) {
        let server = Server::on(&backend, &plugin_set(&[], &["misbehave"]));
        let api = server.api();
        let (status, answer) = api
            .post_raw(
                "/events",
                r#"{"events":[
                    {"stream":"d-1","stream_type":"T","type":"Echo","payload":{"a":1}},
                    {"stream":"d-2","stream_type":"T","type":"Echo","payload":{"items":[{"price":1,"price":2}]}}
                ]}"#,
            )
            .await;
        assert_eq!(status, 400, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("events[1]"), "{message}");
        assert!(message.contains("payload.items[0].price"), "{message}");
        assert_eq!(answer["error"]["index"], 1, "{answer}");
        // Nothing of the request was written.
        assert!(outbox_payloads(&backend, &server).await.is_empty());
    }
}
