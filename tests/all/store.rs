//! The `Store` seam itself, on both databases, through the library.

use std::sync::Arc;

use projector::config::PostgresConfig;
use projector::runtime::{BatchOutput, CollectionSpec, Descriptor};
use projector::store::postgres::Postgres;
use projector::store::sqlite::Sqlite;
use projector::store::{ListQuery, Store, StoreError};

use crate::support::{on_both_stores, tempdir, Backend};

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
        store.commit(&descriptor, &batch, &[], 0, 10, true).await.unwrap();
        let again = store.commit(&descriptor, &batch, &[], 0, 10, true).await;
        assert!(
            matches!(again, Err(StoreError::Fenced { expected: 0, .. })),
            "{again:?}"
        );
        let doc = store.document(&descriptor, "c", "k").await.unwrap().unwrap();
        assert_eq!(doc.version, 1, "the fenced batch wrote nothing");
        assert_eq!(store.checkpoint(&descriptor).await.unwrap(), 10);
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
        store
            .commit(&eu, &one_document(&format!("{long}_eu"), "k", r#"{"r": "eu"}"#), &[], 0, 1, true)
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
        store.commit(&descriptor, &first, &[], 0, 1, true).await.unwrap();
        // a: nothing indexed changes; b: status changes; c: the nested city changes; d: new.
        let second = batch(&[
            ("a", doc("open", "Graz", 2)),
            ("b", doc("closed", "Wien", 2)),
            ("c", doc("open", "Linz", 2)),
            ("d", doc("closed", "Graz", 1)),
        ]);
        store.commit(&descriptor, &second, &[], 1, 2, true).await.unwrap();
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
        .commit(&descriptor, &output, &[], 0, 1, true)
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
    store
        .commit(&both, &write("old"), &[], 0, 1, true)
        .await
        .unwrap();
    store.register(&one).await.unwrap();
    store
        .commit(&one, &write("new"), &[], 1, 2, true)
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
