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
}
