//! The `Store` seam itself, on both databases, through the library.

use std::sync::Arc;

use projector::config::PostgresConfig;
use projector::runtime::{BatchOutput, CollectionSpec, Descriptor};
use projector::store::postgres::Postgres;
use projector::store::sqlite::Sqlite;
use projector::store::{
    AdminAction, Batch, DeadLetter, LetterCounts, LetterKind, LetterState, ListQuery, ParkedStream,
    Store, StoreError,
};

use projector::event::Event;

use crate::support::{on_both_stores, tempdir, Backend, Events};

async fn open(backend: &Backend) -> Arc<dyn Store> {
    match backend {
        Backend::Sqlite => {
            let file = tempdir("store").join("p.db");
            Arc::new(
                Sqlite::open(&format!("sqlite://{}", file.display()))
                    .await
                    .unwrap(),
            )
        }
        Backend::Postgres { url } => Arc::new(
            Postgres::open(url, &PostgresConfig::default())
                .await
                .unwrap(),
        ),
    }
}

fn one_document(collection: &str, key: &str, doc: &str) -> BatchOutput {
    let mut output = BatchOutput::default();
    output
        .writes
        .entry(collection.into())
        .or_default()
        .insert(key.into(), Some(doc.as_bytes().to_vec()));
    output
}

on_both_stores! {
    /// Two instances that both think they run a projection: the second commit from the same
    /// checkpoint is refused, so no batch is ever applied twice.
    async fn a_commit_from_a_checkpoint_that_moved_is_fenced(backend) {
        let store = open(&backend).await;
        let descriptor = Descriptor {
            name: "fenced".into(),
            version: "1".into(),
            event_types: vec![],
            collections: vec![CollectionSpec { name: "c".into(), indexes: vec![] }],
        };
        assert_eq!(store.register(&descriptor).await.unwrap(), 0);
        let batch = one_document("c", "k", r#"{"n": 1}"#);
        let commit = Batch { output: &batch, from: 0, to: 10, durable: true, ..Default::default() };
        store.commit(&descriptor, &commit).await.unwrap();
        let again = store.commit(&descriptor, &commit).await;
        assert!(
            matches!(again, Err(StoreError::Fenced { expected: 0, .. })),
            "{again:?}"
        );
        let mut delete = BatchOutput::default();
        delete.writes.entry("c".into()).or_default().insert("k".into(), None);
        let fenced_delete = Batch { output: &delete, from: 0, to: 11, durable: true, ..Default::default() };
        let again = store.commit(&descriptor, &fenced_delete).await;
        assert!(matches!(again, Err(StoreError::Fenced { expected: 0, .. })), "{again:?}");
        let doc = store.document(&descriptor, "c", "k").await.unwrap().unwrap();
        assert_eq!(doc.version, 1, "the fenced batches wrote nothing");
        assert_eq!(store.checkpoint(&descriptor).await.unwrap(), 10);
        // The same delete from the checkpoint that holds goes through.
        let delete_from_10 = Batch { output: &delete, from: 10, to: 11, durable: true, ..Default::default() };
        store.commit(&descriptor, &delete_from_10).await.unwrap();
        assert!(store.document(&descriptor, "c", "k").await.unwrap().is_none());
        assert_eq!(store.checkpoint(&descriptor).await.unwrap(), 11);
    }

    /// Names at the limits of what a plugin may declare still get tables and indexes of
    /// their own (PostgreSQL cuts identifiers at 63 bytes).
    async fn long_names_never_share_a_table(backend) {
        let store = open(&backend).await;
        let long = "a".repeat(60);
        let descriptor = |collection: &str| Descriptor {
            name: format!("{long}-x"),
            version: "1.0.0".into(),
            event_types: vec![],
            collections: vec![CollectionSpec {
                name: collection.into(),
                indexes: vec![format!("{long}.one"), format!("{long}.two")],
            }],
        };
        let (eu, us) = (descriptor(&format!("{long}_eu")), descriptor(&format!("{long}_us")));
        store.register(&eu).await.unwrap();
        store.register(&us).await.unwrap();
        let output = one_document(&format!("{long}_eu"), "k", r#"{"r": "eu"}"#);
        store
            .commit(&eu, &Batch { output: &output, from: 0, to: 1, durable: true, ..Default::default() })
            .await
            .unwrap();
        let page = store
            .list(&us, &format!("{long}_us"), &ListQuery { limit: 10, ..ListQuery::default() })
            .await
            .unwrap();
        assert!(page.is_empty(), "the us collection sees the eu document");
    }
    /// Documents whose indexed fields change and documents whose fields stay put, in one
    /// batch and across batches: filters find each by its latest values, and every write
    /// counts once in the version (SQLite writes the two kinds with different statements).
    async fn indexed_fields_follow_every_write_whether_they_change_or_not(backend) {
        let store = open(&backend).await;
        let descriptor = Descriptor {
            name: "fields".into(),
            version: "1".into(),
            event_types: vec![],
            collections: vec![CollectionSpec {
                name: "c".into(),
                indexes: vec!["status".into(), "owner.city".into(), "status".into()],
            }],
        };
        store.register(&descriptor).await.unwrap();
        let batch = |docs: &[(&str, serde_json::Value)]| {
            let mut output = BatchOutput::default();
            let writes = output.writes.entry("c".into()).or_default();
            for (key, doc) in docs {
                writes.insert((*key).into(), Some(doc.to_string().into_bytes()));
            }
            output
        };
        let doc = |status: &str, city: &str, n: i64| {
            serde_json::json!({"status": status, "owner": {"city": city}, "n": n})
        };
        let first = batch(&[
            ("a", doc("open", "Graz", 1)),
            ("b", doc("open", "Wien", 1)),
            ("c", doc("open", "Graz", 1)),
        ]);
        store
            .commit(&descriptor, &Batch { output: &first, from: 0, to: 1, durable: true, ..Default::default() })
            .await
            .unwrap();
        // a: nothing indexed changes; b: status changes; c: the nested city changes; d: new.
        let second = batch(&[
            ("a", doc("open", "Graz", 2)),
            ("b", doc("closed", "Wien", 2)),
            ("c", doc("open", "Linz", 2)),
            ("d", doc("closed", "Graz", 1)),
        ]);
        store
            .commit(&descriptor, &Batch { output: &second, from: 1, to: 2, durable: true, ..Default::default() })
            .await
            .unwrap();
        let keys = |filters: &[(&str, &str)]| {
            let store = store.clone();
            let descriptor = descriptor.clone();
            let query = ListQuery {
                filters: filters.iter().map(|(f, v)| (f.to_string(), v.to_string())).collect(),
                limit: 10,
                ..ListQuery::default()
            };
            async move {
                let page = store.list(&descriptor, "c", &query).await.unwrap();
                page.into_iter().map(|d| d.key).collect::<Vec<_>>()
            }
        };
        assert_eq!(keys(&[("status", "open")]).await, ["a", "c"]);
        assert_eq!(keys(&[("status", "closed")]).await, ["b", "d"]);
        assert_eq!(keys(&[("owner.city", "Graz")]).await, ["a", "d"]);
        assert_eq!(keys(&[("owner.city", "Linz")]).await, ["c"]);
        assert_eq!(keys(&[("owner.city", "Wien"), ("status", "closed")]).await, ["b"]);
        for (key, version, n) in [("a", 2, 2), ("b", 2, 2), ("c", 2, 2), ("d", 1, 1)] {
            let found = store.document(&descriptor, "c", key).await.unwrap().unwrap();
            assert_eq!(found.version, version, "{key}");
            let json: serde_json::Value = serde_json::from_str(found.json.get()).unwrap();
            assert_eq!(json["n"], n, "{key}");
        }
    }
}

on_both_stores! {
    /// A dead letter parks its stream's later events; an operator's retry (a commit that does
    /// not move the checkpoint) releases them, resolves the letter and records the action, all
    /// at once; and a fenced instance can do none of it.
    async fn dead_letters_park_their_streams_until_an_operator_resolves_them(backend) {
        let store = open(&backend).await;
        let descriptor = Descriptor {
            name: "letters".into(),
            version: "1".into(),
            event_types: vec![],
            collections: vec![CollectionSpec { name: "c".into(), indexes: vec![] }],
        };
        store.register(&descriptor).await.unwrap();
        let mut events = Events::default();
        let a1 = events.next("a", "Failed", serde_json::json!({"n": 1, "text": "é \"x\""}));
        let b1 = events.next("b", "Fine", serde_json::json!({"n": 1}));
        let a2 = events.next("a", "Fine", serde_json::json!({"n": 2}));
        let a3 = events.next("a", "Fine", serde_json::json!({"n": 3}));
        let letter = |event: &Event, kind: LetterKind, behind: Option<u64>, reason: &str| DeadLetter {
            position: event.position,
            event_id: Some(event.id.clone()),
            stream: Some(event.stream.clone()),
            reason: reason.into(),
            parked_behind: behind,
            kind,
            state: LetterState::Open,
            resolved_at: None,
            plugin_version: (kind == LetterKind::Plugin).then(|| "1.2.0".into()),
            event: Some(event.clone()),
            actions: vec![],
        };
        let head = letter(&a1, LetterKind::Plugin, None, "boom");
        let parked = vec![
            letter(&a2, LetterKind::Parked, Some(a1.position), "parked behind 1"),
            letter(&a3, LetterKind::Parked, Some(a1.position), "parked behind 1"),
        ];
        let mut letters = vec![head.clone()];
        letters.extend(parked.iter().cloned());
        let b_doc = one_document("c", &b1.stream, r#"{"n": 1}"#);
        store
            .commit(&descriptor, &Batch {
                output: &b_doc,
                dead_letters: &letters,
                from: 0,
                to: a3.position,
                durable: true,
                ..Default::default()
            })
            .await
            .unwrap();

        assert_eq!(
            store.parked_streams(&descriptor).await.unwrap(),
            std::collections::HashMap::from([("a".to_owned(), a1.position)])
        );
        assert_eq!(
            store.parked(&descriptor).await.unwrap(),
            [ParkedStream { stream: "a".into(), behind: a1.position, reason: "boom".into(), events: 2 }]
        );
        let found = store.dead_letter(&descriptor, a1.position).await.unwrap().unwrap();
        assert_eq!(found, head);
        let event = found.event.as_ref().unwrap();
        assert_eq!(
            (event.id.as_str(), event.payload.get(), event.timestamp_ms),
            (a1.id.as_str(), a1.payload.get(), a1.timestamp_ms)
        );
        assert_eq!(store.parked_behind(&descriptor, a1.position).await.unwrap(), parked);
        assert!(store.parked_behind(&descriptor, a2.position).await.unwrap().is_empty());
        assert!(store.dead_letter(&descriptor, b1.position).await.unwrap().is_none());
        let listed = store.dead_letters(&descriptor, 0, 10).await.unwrap();
        let summary = |letters: &[DeadLetter]| -> Vec<(u64, LetterKind, LetterState, usize)> {
            letters.iter().map(|l| (l.position, l.kind, l.state, l.actions.len())).collect()
        };
        assert_eq!(
            summary(&listed),
            [
                (1, LetterKind::Plugin, LetterState::Open, 0),
                (3, LetterKind::Parked, LetterState::Open, 0),
                (4, LetterKind::Parked, LetterState::Open, 0)
            ]
        );
        assert_eq!(store.dead_letters(&descriptor, 1, 1).await.unwrap()[0].position, 3);

        // A retry that fails again: the letter is written again with the new reason (the
        // checkpoint stays, compared all the same), the action recorded.
        let failed = AdminAction {
            action: "retry".into(),
            target: Some(a1.position),
            at: 1_700_000_000_000,
            outcome: "failed again: boom again".into(),
        };
        let again = DeadLetter { reason: "boom again".into(), ..head.clone() };
        store
            .commit(&descriptor, &Batch {
                dead_letters: std::slice::from_ref(&again),
                actions: std::slice::from_ref(&failed),
                from: a3.position,
                to: a3.position,
                ..Default::default()
            })
            .await
            .unwrap();
        let found = store.dead_letter(&descriptor, a1.position).await.unwrap().unwrap();
        assert_eq!((found.reason.as_str(), found.state), ("boom again", LetterState::Open));
        assert_eq!(found.actions, std::slice::from_ref(&failed));

        // The successful retry, from a checkpoint that moved: fenced, and nothing changes.
        let a_doc = one_document("c", "a", r#"{"n": 3}"#);
        let retried = AdminAction {
            action: "retry".into(),
            target: Some(a1.position),
            at: 1_700_000_000_001,
            outcome: "applied 3 events".into(),
        };
        let released = [a2.position, a3.position];
        let retry = Batch {
            output: &a_doc,
            released: &released,
            resolved: Some((a1.position, LetterState::Retried)),
            actions: std::slice::from_ref(&retried),
            from: a2.position,
            to: a2.position,
            durable: true,
            ..Default::default()
        };
        let fenced = store.commit(&descriptor, &retry).await;
        assert!(matches!(fenced, Err(StoreError::Fenced { expected: 3, .. })), "{fenced:?}");
        assert!(store.document(&descriptor, "c", "a").await.unwrap().is_none());
        let listed = store.dead_letters(&descriptor, 0, 10).await.unwrap();
        assert_eq!(
            summary(&listed),
            [
                (1, LetterKind::Plugin, LetterState::Open, 1),
                (3, LetterKind::Parked, LetterState::Open, 0),
                (4, LetterKind::Parked, LetterState::Open, 0)
            ]
        );
        assert_eq!(store.parked(&descriptor).await.unwrap().len(), 1);
        assert_eq!(store.checkpoint(&descriptor).await.unwrap(), a3.position);

        // From the checkpoint where it is: all of it at once.
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        store
            .commit(&descriptor, &Batch { from: a3.position, to: a3.position, ..retry })
            .await
            .unwrap();
        assert!(store.parked(&descriptor).await.unwrap().is_empty());
        assert!(store.parked_streams(&descriptor).await.unwrap().is_empty());
        assert!(store.parked_behind(&descriptor, a1.position).await.unwrap().is_empty());
        let found = store.dead_letter(&descriptor, a1.position).await.unwrap().unwrap();
        assert_eq!(found.state, LetterState::Retried);
        assert!(!found.is_open());
        assert!(found.resolved_at.is_some_and(|at| at >= before), "{found:?}");
        assert_eq!(found.actions, [failed.clone(), retried.clone()]);
        assert!(found.event.is_some());
        let listed = store.dead_letters(&descriptor, 0, 10).await.unwrap();
        assert_eq!(summary(&listed), [(1, LetterKind::Plugin, LetterState::Retried, 2)]);
        assert_eq!(listed[0].actions, [failed, retried]);
        let doc = store.document(&descriptor, "c", "a").await.unwrap().unwrap();
        assert_eq!(doc.json.get(), r#"{"n": 3}"#);
        assert_eq!(store.checkpoint(&descriptor).await.unwrap(), a3.position);

        // Actions on the projection itself name no letter.
        store
            .record_action(&descriptor, &AdminAction {
                action: "pause".into(),
                target: None,
                at: 1_700_000_000_002,
                outcome: "paused".into(),
            })
            .await
            .unwrap();
        assert_eq!(store.dead_letters(&descriptor, 0, 10).await.unwrap()[0].actions.len(), 2);
        // A letter of another version of the projection is its own.
        let other = Descriptor { version: "2".into(), ..descriptor.clone() };
        store.register(&other).await.unwrap();
        assert!(store.dead_letters(&other, 0, 10).await.unwrap().is_empty());
    }

    /// An operator's pause holds across restarts: registering the projection again (as every
    /// start does) leaves it paused.
    async fn a_pause_survives_registering_again(backend) {
        let store = open(&backend).await;
        let descriptor = Descriptor {
            name: "pausable".into(),
            version: "1".into(),
            event_types: vec![],
            collections: vec![],
        };
        assert!(!store.paused("pausable").await.unwrap(), "no row yet");
        store.register(&descriptor).await.unwrap();
        assert!(!store.paused("pausable").await.unwrap());
        store.set_paused("pausable", true).await.unwrap();
        assert!(store.paused("pausable").await.unwrap());
        store.register(&descriptor).await.unwrap();
        store
            .register(&Descriptor { version: "2".into(), ..descriptor.clone() })
            .await
            .unwrap();
        assert!(store.paused("pausable").await.unwrap());
        assert!(!store.paused("other").await.unwrap());
        store.set_paused("pausable", false).await.unwrap();
        assert!(!store.paused("pausable").await.unwrap());
    }

    /// Admin commands queue per projection, oldest first, until answered.
    async fn admin_commands_wait_for_their_answers(backend) {
        let store = open(&backend).await;
        let first = store.submit_command("p", r#"{"action":"pause"}"#).await.unwrap();
        let second = store.submit_command("p", r#"{"action":"retry","position":7}"#).await.unwrap();
        let elsewhere = store.submit_command("q", r#"{"action":"resume"}"#).await.unwrap();
        assert!(first < second && first != elsewhere && second != elsewhere);
        assert_eq!(
            store.pending_commands("p").await.unwrap(),
            [
                (first, r#"{"action":"pause"}"#.to_owned()),
                (second, r#"{"action":"retry","position":7}"#.to_owned())
            ]
        );
        assert_eq!(store.command_answer(first).await.unwrap(), None);
        assert!(store.answer_command(first, r#"{"pending":true}"#, true).await.unwrap());
        // Claimed once: a second claim (another instance) does not land.
        assert!(!store.answer_command(first, r#"{"pending":true}"#, true).await.unwrap());
        assert!(store.answer_command(first, r#"{"ok":true}"#, false).await.unwrap());
        assert_eq!(
            store.command_answer(first).await.unwrap().as_deref(),
            Some(r#"{"ok":true}"#)
        );
        assert_eq!(
            store.pending_commands("p").await.unwrap(),
            [(second, r#"{"action":"retry","position":7}"#.to_owned())]
        );
        assert_eq!(store.pending_commands("q").await.unwrap().len(), 1);
        assert!(store.pending_commands("none").await.unwrap().is_empty());
        assert_eq!(store.command_answer(second).await.unwrap(), None);
        assert_eq!(store.command_answer(elsewhere + 1000).await.unwrap(), None);
        // A fresh answer is kept while further commands come in.
        store.submit_command("p", "{}").await.unwrap();
        assert!(store.command_answer(first).await.unwrap().is_some());
    }

    /// A database written by the previous version (migrations 1 and 2, dead letters without
    /// kind or state) migrates: its letters read back open, heads as malformed rows, the
    /// rest parked behind them, and their streams stay parked.
    async fn dead_letters_of_the_previous_schema_migrate(backend) {
        let descriptor = Descriptor {
            name: "old".into(),
            version: "1".into(),
            event_types: vec![],
            collections: vec![],
        };
        let rows = "INSERT INTO {s}dead_letters (projection, version, position, event_id, stream, \
             reason, parked_behind, created_at) VALUES \
             ('old', '1', 5, 'e5', 's', 'not JSON', NULL, 0), \
             ('old', '1', 7, 'e7', 's', 'parked behind 5', 5, 0), \
             ('old', '1', 8, NULL, NULL, 'no stream', NULL, 0); \
             INSERT INTO {s}projections (name, version, status, error, updated_at) \
             VALUES ('old', '1', 'running', NULL, 0); \
             INSERT INTO {s}checkpoints (projection, version, position, updated_at) \
             VALUES ('old', '1', 9, 0)";
        let store: Arc<dyn Store> = match &backend {
            Backend::Sqlite => {
                use sqlx::Connection;
                let file = tempdir("store").join("v2.db");
                let url = format!("sqlite://{}", file.display());
                let options = url
                    .parse::<sqlx::sqlite::SqliteConnectOptions>()
                    .unwrap()
                    .create_if_missing(true);
                let mut conn = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
                let v2 = format!(
                    "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, \
                     applied_at INTEGER NOT NULL); \
                     INSERT INTO schema_migrations VALUES (1, 0), (2, 0); {} {} {}",
                    include_str!("../../migrations/sqlite/0001_init.sql"),
                    include_str!("../../migrations/sqlite/0002_dead_letters.sql"),
                    rows.replace("{s}", ""),
                );
                sqlx::raw_sql(&v2).execute(&mut conn).await.unwrap();
                conn.close().await.unwrap();
                Arc::new(Sqlite::open(&url).await.unwrap())
            }
            Backend::Postgres { url } => {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
                let v2 = format!(
                    "CREATE SCHEMA projector; \
                     CREATE TABLE projector.schema_migrations (version bigint PRIMARY KEY, \
                     applied_at bigint NOT NULL); \
                     INSERT INTO projector.schema_migrations VALUES (1, 0), (2, 0); {} {} {}",
                    include_str!("../../migrations/postgres/0001_init.sql"),
                    include_str!("../../migrations/postgres/0002_dead_letters.sql"),
                    rows.replace("{s}", "__SCHEMA__."),
                )
                .replace("__SCHEMA__", "\"projector\"");
                sqlx::raw_sql(&v2).execute(&mut conn).await.unwrap();
                conn.close().await.unwrap();
                Arc::new(Postgres::open(url, &PostgresConfig::default()).await.unwrap())
            }
        };
        assert_eq!(store.register(&descriptor).await.unwrap(), 9);
        assert!(!store.paused("old").await.unwrap());
        let listed = store.dead_letters(&descriptor, 0, 10).await.unwrap();
        let summary: Vec<_> = listed
            .iter()
            .map(|l| (l.position, l.kind, l.state, l.parked_behind, l.reason.as_str(), l.event.is_none()))
            .collect();
        assert_eq!(
            summary,
            [
                (5, LetterKind::Malformed, LetterState::Open, None, "not JSON", true),
                (7, LetterKind::Parked, LetterState::Open, Some(5), "parked behind 5", true),
                (8, LetterKind::Malformed, LetterState::Open, None, "no stream", true)
            ]
        );
        assert_eq!(
            store.parked_streams(&descriptor).await.unwrap(),
            std::collections::HashMap::from([("s".to_owned(), 5)])
        );
        assert_eq!(
            store.parked(&descriptor).await.unwrap(),
            [ParkedStream { stream: "s".into(), behind: 5, reason: "not JSON".into(), events: 1 }]
        );
        // Counted: both malformed letters are open (the one without a stream parks nothing),
        // the parked event is not a letter to act on.
        assert_eq!(
            store.letter_counts(&descriptor).await.unwrap(),
            LetterCounts { open: 2, parked_streams: 1, parked_events: 1 }
        );
        let head = store.dead_letter(&descriptor, 5).await.unwrap().unwrap();
        assert_eq!((head.event_id.as_deref(), head.resolved_at, head.plugin_version), (Some("e5"), None, None));
        assert_eq!(store.parked_behind(&descriptor, 5).await.unwrap().len(), 1);
    }
}

/// A read-model table made by an earlier projector (documents as JSONB, expression indexes)
/// gets its field columns, filled from the documents it holds, when the projection registers.
#[tokio::test]
async fn sqlite_tables_of_earlier_versions_get_field_columns_on_register() {
    use projector::store::table_name;
    use sqlx::Connection;

    let file = tempdir("store").join("legacy.db");
    let url = format!("sqlite://{}", file.display());
    let descriptor = Descriptor {
        name: "legacy".into(),
        version: "1".into(),
        event_types: vec![],
        collections: vec![CollectionSpec {
            name: "c".into(),
            indexes: vec!["status".into()],
        }],
    };
    let table = table_name(&descriptor, "c");
    {
        let options = url
            .parse::<sqlx::sqlite::SqliteConnectOptions>()
            .unwrap()
            .create_if_missing(true);
        let mut conn = sqlx::SqliteConnection::connect_with(&options)
            .await
            .unwrap();
        for sql in [
            format!(
                "CREATE TABLE \"{table}\" (key TEXT PRIMARY KEY, doc BLOB NOT NULL, \
                 version INTEGER NOT NULL, updated_at INTEGER NOT NULL) WITHOUT ROWID"
            ),
            format!(
                "CREATE INDEX \"{table}_ix_status\" ON \"{table}\" (json_extract(doc, '$.status'))"
            ),
            format!(
                "INSERT INTO \"{table}\" VALUES ('a', jsonb('{{\"status\":\"open\"}}'), 3, 0), \
                 ('b', jsonb('{{\"status\":\"closed\"}}'), 1, 0)"
            ),
        ] {
            sqlx::query(&sql).execute(&mut conn).await.unwrap();
        }
        conn.close().await.unwrap();
    }
    let store = Sqlite::open(&url).await.unwrap();
    store.register(&descriptor).await.unwrap();
    let keys = |status: &str| {
        let (store, descriptor) = (store.clone(), descriptor.clone());
        let query = ListQuery {
            filters: vec![("status".into(), status.into())],
            limit: 10,
            ..ListQuery::default()
        };
        async move {
            let page = store.list(&descriptor, "c", &query).await.unwrap();
            page.into_iter()
                .map(|d| (d.key, d.json.get().to_owned(), d.version))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        keys("open").await,
        [("a".into(), r#"{"status":"open"}"#.into(), 3)]
    );
    // An unchanged field (a) and a changed one (b) after the move.
    let mut output = BatchOutput::default();
    let writes = output.writes.entry("c".into()).or_default();
    writes.insert("a".into(), Some(br#"{"status":"open","n":1}"#.to_vec()));
    writes.insert("b".into(), Some(br#"{"status":"open","n":2}"#.to_vec()));
    store
        .commit(
            &descriptor,
            &Batch {
                output: &output,
                from: 0,
                to: 1,
                durable: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        keys("open").await,
        [
            ("a".into(), r#"{"status":"open","n":1}"#.into(), 4),
            ("b".into(), r#"{"status":"open","n":2}"#.into(), 2)
        ]
    );
    assert!(keys("closed").await.is_empty());

    // An earlier version run on the file again (a rollback) writes JSONB documents without
    // filling the columns and makes its index again; the next start brings those rows up.
    {
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        for sql in [
            format!(
                "CREATE INDEX \"{table}_ix_status\" ON \"{table}\" (json_extract(doc, '$.status'))"
            ),
            format!(
                "UPDATE \"{table}\" SET doc = jsonb('{{\"status\":\"closed\"}}'), version = 3 \
                 WHERE key = 'b'"
            ),
            format!("INSERT INTO \"{table}\" (key, doc, version, updated_at) VALUES ('c', jsonb('{{\"status\":\"closed\"}}'), 1, 0)"),
        ] {
            sqlx::query(&sql).execute(&mut conn).await.unwrap();
        }
        conn.close().await.unwrap();
    }
    store.register(&descriptor).await.unwrap();
    assert_eq!(
        keys("closed").await,
        [
            ("b".into(), r#"{"status":"closed"}"#.into(), 3),
            ("c".into(), r#"{"status":"closed"}"#.into(), 1)
        ]
    );
    assert_eq!(keys("open").await.len(), 1);
}

/// The same projection version started with a field left out and later declared again: the
/// field's column was not kept up to date in between, so it is filled afresh from the
/// documents, and the filter finds what the documents say.
#[tokio::test]
async fn sqlite_a_field_declared_again_is_refilled_not_found_stale() {
    let file = tempdir("store").join("redeclared.db");
    let store = Sqlite::open(&format!("sqlite://{}", file.display()))
        .await
        .unwrap();
    let descriptor = |indexes: &[&str]| Descriptor {
        name: "redeclared".into(),
        version: "1".into(),
        event_types: vec![],
        collections: vec![CollectionSpec {
            name: "c".into(),
            indexes: indexes.iter().map(|f| f.to_string()).collect(),
        }],
    };
    let (both, one) = (descriptor(&["a", "b"]), descriptor(&["a"]));
    store.register(&both).await.unwrap();
    let write = |b: &str| one_document("c", "k", &format!(r#"{{"a": 1, "b": "{b}"}}"#));
    let old = write("old");
    store
        .commit(
            &both,
            &Batch {
                output: &old,
                from: 0,
                to: 1,
                durable: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    store.register(&one).await.unwrap();
    let new = write("new");
    store
        .commit(
            &one,
            &Batch {
                output: &new,
                from: 1,
                to: 2,
                durable: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    store.register(&both).await.unwrap();
    let find = |b: &str| {
        let (store, both) = (store.clone(), both.clone());
        let query = ListQuery {
            filters: vec![("b".into(), b.into())],
            limit: 10,
            ..ListQuery::default()
        };
        async move { store.list(&both, "c", &query).await.unwrap().len() }
    };
    assert_eq!((find("new").await, find("old").await), (1, 0));
}
