//! A store migrated by a newer release stays usable by this one: during a rolling upgrade the
//! previous release's processes restart on the new schema, and a rollback of the binary runs
//! the older release on it. Migrations only add, so a release must not refuse a store whose
//! migration record holds versions it does not know. Checked by recording a migration from
//! "the future" and then opening, migrating and working the store with this binary.

use std::time::Duration;

use conveyor_tests::TestStore;
use conveyor_worker::store::{self, FetchRequest, JobFilter, StoreOptions};
use conveyor_worker::{JobState, NewJob};
use serde_json::json;
use sqlx::Connection;

/// A version far above any real one: the record a newer release's migration would leave.
const FUTURE: i64 = 99_990_101_000_000;

async fn works_on_a_store_a_newer_release_migrated(t: TestStore, record: &'static str) {
    let first = store::connect(&t.url, StoreOptions::default())
        .await
        .unwrap();
    first.migrate().await.unwrap();
    first
        .enqueue(NewJob::new("k", json!({})).queue("upgrade"))
        .await
        .unwrap();
    drop(first);
    // The newer release's migration, as sqlx records it.
    if t.url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(&t.url).await.unwrap();
        sqlx::query(record)
            .bind(FUTURE)
            .execute(&mut conn)
            .await
            .unwrap();
    } else {
        let mut conn = sqlx::PgConnection::connect(&t.url).await.unwrap();
        sqlx::query(record)
            .bind(FUTURE)
            .execute(&mut conn)
            .await
            .unwrap();
    }

    // This release opens it, migrates (nothing to do) and works on it.
    let store = store::connect(&t.url, StoreOptions::default())
        .await
        .expect("a store with a newer release's migration opens");
    store
        .migrate()
        .await
        .expect("a newer release's migration is not refused");
    store.ping().await.expect("and the store is healthy");
    store
        .enqueue(NewJob::new("k", json!({})).queue("upgrade"))
        .await
        .unwrap();
    let got = store
        .fetch(FetchRequest {
            queue: "upgrade",
            limit: 10,
            worker: "w",
            lease: Duration::from_secs(30),
        })
        .await
        .unwrap();
    assert_eq!(got.len(), 2, "the job from before and the new one run");
    assert_eq!(
        store
            .count(&JobFilter::state(JobState::Running))
            .await
            .unwrap(),
        2
    );
}

#[tokio::test]
async fn sqlite_works_on_a_store_a_newer_release_migrated() {
    works_on_a_store_a_newer_release_migrated(
        TestStore::sqlite().await,
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (?, 'from a newer release', 1, x'00', 0)",
    )
    .await;
}

#[tokio::test]
async fn postgres_works_on_a_store_a_newer_release_migrated() {
    let Some(t) = TestStore::postgres().await else {
        return;
    };
    works_on_a_store_a_newer_release_migrated(
        t,
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ($1, 'from a newer release', true, '\\x00', 0)",
    )
    .await;
}
