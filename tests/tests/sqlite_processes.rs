//! Several processes on one SQLite file: each process's store learns about jobs another one
//! enqueued from its watcher (every 50 ms), not only from the worker's poll.

use std::time::Duration;

use conveyor_tests::TestStore;
use conveyor_worker::NewJob;
use conveyor_worker::store::{self, StoreEvent, StoreOptions};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_enqueued_by_another_process_wakes_this_one() {
    let t = TestStore::sqlite().await;
    // A second, independent store on the same file stands in for another process: it shares
    // nothing in memory with the first.
    let other = store::connect(&t.url, StoreOptions::default())
        .await
        .expect("a second store opens the same file");
    let mut events = t.store.subscribe();
    // Let the watcher take its first reading before anything changes.
    tokio::time::sleep(Duration::from_millis(150)).await;

    other
        .enqueue(NewJob::new("noop", json!({})).queue("elsewhere"))
        .await
        .unwrap();
    let woke = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match events.recv().await {
                Ok(StoreEvent::JobsAvailable { queue }) if queue == "elsewhere" => return,
                Ok(_) => continue,
                Err(e) => panic!("event channel failed: {e}"),
            }
        }
    })
    .await;
    // Nothing but the watcher can send this: the first store enqueued nothing itself.
    assert!(woke.is_ok(), "no wake-up within 2 s");
}
