//! Typed enqueue into a store: the job takes its type's defaults, the builder overrides them,
//! and a unique kind's equal args make one job.

use std::time::Duration;

use conveyor_client::{JobArgs, StoreClient};
use conveyor_worker::store::{self, StoreOptions};

#[derive(serde::Serialize, serde::Deserialize)]
struct SendInvoice {
    invoice: u64,
}

impl JobArgs for SendInvoice {
    const KIND: &'static str = "invoice.send";
    const QUEUE: &'static str = "billing";
    const PRIORITY: i16 = -3;
    const MAX_ATTEMPTS: i32 = 6;
    const UNIQUE_FOR: Option<Duration> = Some(Duration::from_secs(3600));
}

#[tokio::test]
async fn a_store_enqueue_takes_the_types_defaults() {
    let dir = std::env::temp_dir().join(format!("conveyor-client-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("jobs.db").display());
    let store = store::connect(&url, StoreOptions::default()).await.unwrap();
    let client = StoreClient::new(store.clone());

    let first = client
        .enqueue(SendInvoice { invoice: 1 })
        .send()
        .await
        .unwrap();
    let job = store.get(first.id).await.unwrap().unwrap();
    assert_eq!(
        (
            job.kind.as_str(),
            job.queue.as_str(),
            job.priority,
            job.max_attempts
        ),
        ("invoice.send", "billing", -3, 6)
    );
    assert!(
        job.idempotency_key
            .unwrap()
            .starts_with("unique:invoice.send:")
    );

    // Equal args within the window: the first job again. Other args: a new one.
    let again = client
        .enqueue(SendInvoice { invoice: 1 })
        .send()
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.id, first.id);
    let other = client
        .enqueue(SendInvoice { invoice: 2 })
        .send()
        .await
        .unwrap();
    assert!(!other.duplicate);

    // The builder overrides the defaults; a key given at enqueue replaces the derived one.
    let custom = client
        .enqueue(SendInvoice { invoice: 1 })
        .queue("urgent")
        .max_attempts(2)
        .idempotency_key("invoice-1-resend")
        .send()
        .await
        .unwrap();
    assert!(!custom.duplicate);
    let job = store.get(custom.id).await.unwrap().unwrap();
    assert_eq!((job.queue.as_str(), job.max_attempts), ("urgent", 2));
    assert_eq!(job.idempotency_key.as_deref(), Some("invoice-1-resend"));
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}
