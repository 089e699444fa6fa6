//! Redis only: a backlog of 200,000 due jobs does not wedge a worker. Promotion of due jobs
//! works in bounded chunks, so the first fetch after they come due claims its batch without
//! touching the whole backlog, and the promoter drains the rest chunk by chunk.

use std::time::Duration;

use chrono::Utc;
use conveyor_tests::TestStore;
use conveyor_worker::JobState;
use conveyor_worker::NewJob;
use conveyor_worker::store::{FetchRequest, JobFilter};
use serde_json::json;

const BACKLOG: usize = 200_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_thousand_due_jobs_do_not_wedge_a_fetch() {
    let Some(t) = TestStore::redis().await else {
        return;
    };
    let s = t.store.clone();
    // Scheduled a moment ahead, so they all land in the delayed set and come due together.
    // The moment is set from how fast this machine enqueues (a first timed batch), with room
    // to spare, so every job is still in the future when it is enqueued.
    let batch = |from: usize, due: chrono::DateTime<Utc>| -> Vec<NewJob> {
        (from..from + 10_000)
            .map(|i| NewJob::new("noop", json!({ "i": i })).run_at(due))
            .collect()
    };
    let probe_due = Utc::now() + chrono::Duration::hours(1);
    let started = std::time::Instant::now();
    s.enqueue_many(batch(0, probe_due)).await.unwrap();
    let per_batch = started.elapsed();
    let due = Utc::now()
        + chrono::Duration::from_std(per_batch * (BACKLOG as u32 / 10_000) * 3).unwrap()
        + chrono::Duration::seconds(1);
    // The probe batch stays scheduled an hour out; the rest comes due at `due`.
    for start in (10_000..BACKLOG).step_by(10_000) {
        let out = s.enqueue_many(batch(start, due)).await.unwrap();
        assert!(
            out.iter().all(|e| e.state == JobState::Scheduled),
            "enqueue was slower than its estimate; jobs were already due"
        );
    }
    assert_eq!(
        s.count(&JobFilter::state(JobState::Scheduled))
            .await
            .unwrap(),
        BACKLOG as u64
    );
    while Utc::now() <= due {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The first fetch promotes one bounded chunk and claims from it. The timeout only keeps a
    // wedged store from hanging the suite; a fetch that unpacked the whole backlog in one
    // script would fail outright ("too many results to unpack") or block Redis for seconds.
    let fetch = |n: u32| {
        let s = s.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(30),
                s.fetch(FetchRequest {
                    queue: "default",
                    limit: n,
                    worker: "w1",
                    lease: Duration::from_secs(60),
                }),
            )
            .await
            .expect("fetch returned")
            .expect("fetch succeeded")
        }
    };
    let first = fetch(100).await;
    assert_eq!(first.len(), 100);
    let left_scheduled = s
        .count(&JobFilter::state(JobState::Scheduled))
        .await
        .unwrap();
    assert!(
        left_scheduled >= (BACKLOG - 10_000) as u64,
        "one fetch promoted a bounded chunk, not the backlog: {left_scheduled} still scheduled"
    );

    // The promoter drains the rest in bounded passes.
    let mut passes = 0;
    loop {
        let moved = s.promote_due(Utc::now(), 5_000).await.unwrap();
        assert!(moved <= 5_000, "a pass moved {moved}, more than its limit");
        passes += 1;
        if moved == 0 {
            break;
        }
        assert!(passes < 100, "promotion did not finish");
    }
    // Everything due is available now; the probe batch is still an hour out.
    assert_eq!(
        s.count(&JobFilter::state(JobState::Available))
            .await
            .unwrap(),
        (BACKLOG - 10_000 - 100) as u64
    );
    assert_eq!(
        s.count(&JobFilter::state(JobState::Scheduled))
            .await
            .unwrap(),
        10_000
    );
    assert_eq!(
        fetch(1000).await.len(),
        1000,
        "fetching still works at depth"
    );
    t.cleanup().await;
}
