//! The Rust client: typed enqueue over HTTP, into the store, and inside a Postgres
//! transaction (the job exists exactly when the transaction commits).

mod common;

use std::sync::Arc;

use common::Server;
use conveyor_api::key::Scope;
use conveyor_client::{Client, StoreClient};
use conveyor_worker::{JobArgs, JobState, Store};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct SendReceipt {
    order: u64,
    email: String,
}

impl JobArgs for SendReceipt {
    const KIND: &'static str = "shop.send_receipt";
}

async fn over_http(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let client = Client::new(&s.base, s.key(Scope::Admin).await).unwrap();
    let at = chrono::Utc::now() + chrono::Duration::minutes(5);
    let first = client
        .enqueue(SendReceipt {
            order: 7,
            email: "a@example.com".into(),
        })
        .queue("mail")
        .idempotency_key("receipt-7")
        .run_at(at)
        .tags(["shop"])
        .send()
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert_eq!(first.state, JobState::Scheduled);
    let again = client
        .enqueue(SendReceipt {
            order: 7,
            email: "a@example.com".into(),
        })
        .idempotency_key("receipt-7")
        .send()
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.id, first.id);

    let job = client.get(first.id).await.unwrap().unwrap();
    assert_eq!(job.kind, "shop.send_receipt");
    assert_eq!(job.queue, "mail");
    assert_eq!(job.args["order"], 7);
    assert_eq!(job.tags, vec!["shop".to_string()]);
    assert!(
        client
            .get(conveyor_worker::JobId::new())
            .await
            .unwrap()
            .is_none()
    );

    // A refusal comes back as the API's problem.
    let enqueue_only = Client::new(&s.base, s.key(Scope::Enqueue).await).unwrap();
    match enqueue_only.get(first.id).await {
        Err(conveyor_client::Error::Api {
            status: 403,
            problem,
        }) => assert_eq!(problem.code, "forbidden"),
        other => panic!("expected 403, got {other:?}"),
    }
    match client
        .enqueue(SendReceipt {
            order: 1,
            email: "x".into(),
        })
        .queue("bad queue")
        .send()
        .await
    {
        Err(conveyor_client::Error::Api {
            status: 422,
            problem,
        }) => assert_eq!(problem.errors[0].field, "queue"),
        other => panic!("expected 422, got {other:?}"),
    }
}

async fn into_the_store(store: Arc<dyn Store>) {
    let client = StoreClient::new(store.clone());
    let e = client
        .enqueue(SendReceipt {
            order: 9,
            email: "b@example.com".into(),
        })
        .priority(-1)
        .max_attempts(3)
        .send()
        .await
        .unwrap();
    let job = store.get(e.id).await.unwrap().unwrap();
    assert_eq!(
        (job.kind.as_str(), job.priority, job.max_attempts),
        ("shop.send_receipt", -1, 3)
    );
}

api_tests!(over_http, into_the_store);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inside_a_postgres_transaction() {
    use sqlx::Connection;
    let Some(t) = conveyor_tests::TestStore::postgres().await else {
        return;
    };
    let mut conn = sqlx::PgConnection::connect(&t.url).await.unwrap();

    let mut tx = conn.begin().await.unwrap();
    let rolled_back = conveyor_client::enqueue_in(
        &mut tx,
        SendReceipt {
            order: 1,
            email: "r@example.com".into(),
        },
    )
    .send()
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert!(
        t.store.get(rolled_back.id).await.unwrap().is_none(),
        "no phantom job"
    );

    let mut tx = conn.begin().await.unwrap();
    let committed = conveyor_client::enqueue_in(
        &mut tx,
        SendReceipt {
            order: 2,
            email: "c@example.com".into(),
        },
    )
    .queue("mail")
    .send()
    .await
    .unwrap();
    assert!(
        t.store.get(committed.id).await.unwrap().is_none(),
        "invisible before commit"
    );
    tx.commit().await.unwrap();
    assert_eq!(
        t.store.get(committed.id).await.unwrap().unwrap().queue,
        "mail"
    );
}
