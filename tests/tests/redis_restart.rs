//! Redis only: a worker keeps going when its Redis server restarts mid-run. The test runs a
//! private `redis-server` (never the shared one other tests use) with an fsynced append-only
//! file, kills it with SIGKILL twice while thousands of jobs are being processed, restarts it
//! on the same port and directory, and checks that every job ends `completed` with exactly one
//! `completed` outcome in its history, and that wake-ups flow again after each restart.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_tests::eventually;
use conveyor_tests::redis_server::PrivateRedis;
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::store::{self, JobFilter, Page, StoreEvent, StoreOptions};
use conveyor_worker::{
    AttemptOutcome, JobContext, JobId, JobState, NewJob, Outcome, Registry, Store,
};
use futures::FutureExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const JOBS: usize = 4000;

type Runs = Arc<Mutex<HashMap<JobId, usize>>>;

fn total_runs(runs: &Runs) -> usize {
    runs.lock().unwrap().values().sum()
}

/// Waits until the handler has run `n` times in all.
async fn wait_for_runs(runs: &Runs, n: usize) {
    eventually(60, &format!("{n} handler runs"), || {
        let runs = runs.clone();
        async move { (total_runs(&runs) >= n).then_some(()) }
    })
    .await;
}

/// Waits until a message published on the store's wake-up channel reaches a subscriber of
/// `events`: the store's pub/sub connection is subscribed (again).
async fn wait_for_wakeups(url: &str, events: &mut tokio::sync::broadcast::Receiver<StoreEvent>) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store's subscriber never came back after the restart"
        );
        // The server may still be busy starting up: a failed PUBLISH is simply sent again.
        let _ = redis::cmd("PUBLISH")
            .arg("conveyor:jobs")
            .arg("probe")
            .query_async::<i64>(&mut conn)
            .await;
        let seen = tokio::time::timeout(Duration::from_millis(200), async {
            loop {
                match events.recv().await {
                    Ok(StoreEvent::JobsAvailable { queue }) if queue == "probe" => return true,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
                }
            }
        })
        .await;
        if seen == Ok(true) {
            return;
        }
    }
}

/// Prints what is left unfinished, to tell a lost claim from a lost outcome.
async fn report_unfinished(s: &Arc<dyn Store>, runs: &Runs) {
    eprintln!("queues: {:?}", s.queue_stats().await);
    for state in [JobState::Running, JobState::Available, JobState::Retryable] {
        let page = Page {
            before: None,
            limit: 20,
        };
        for j in s
            .list(&JobFilter::state(state), page)
            .await
            .unwrap_or_default()
        {
            eprintln!(
                "unfinished {}: {} attempt {} owner {:?}, handler runs {:?}, history {:?}",
                j.id,
                j.state,
                j.attempt,
                j.lease_owner,
                runs.lock().unwrap().get(&j.id),
                j.attempts
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_job_completes_exactly_once_across_redis_restarts() {
    let Some(mut server) = PrivateRedis::start(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
    ])
    .await
    else {
        return;
    };
    let url = server.url();
    let s = store::connect(&url, StoreOptions::default())
        .await
        .expect("the private Redis opens");
    // A second store on the same server only hears about the first one's jobs through
    // pub/sub, so it shows whether the subscriber reconnects.
    let observer = store::connect(&url, StoreOptions::default())
        .await
        .expect("the private Redis opens twice");
    let mut events = observer.subscribe();

    let runs: Runs = Arc::new(Mutex::new(HashMap::new()));
    let mut registry = Registry::new();
    let r = runs.clone();
    registry.register("tick", move |_: serde_json::Value, ctx: JobContext| {
        let r = r.clone();
        async move {
            *r.lock().unwrap().entry(ctx.job.id).or_default() += 1;
            let ms = 1 + (ctx.job.id.0.as_u128() % 5) as u64;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(Outcome::Done)
        }
    });

    let ids: Vec<JobId> = s
        .enqueue_many((0..JOBS).map(|_| NewJob::new("tick", json!({}))).collect())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids.len(), JOBS);

    let worker = Worker::new(
        s.clone(),
        registry,
        WorkerConfig {
            queues: vec![QueueConfig {
                name: "default".into(),
                concurrency: 32,
            }],
            poll_interval: Duration::from_millis(50),
            shutdown_grace: Duration::from_secs(5),
            // The default 30 s lease outlives every outage here, so no job is rescued.
            ..WorkerConfig::default()
        },
    )
    .expect("valid config");
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(worker.run(shutdown.clone()));

    for (round, at) in [JOBS / 5, JOBS / 2].into_iter().enumerate() {
        wait_for_runs(&runs, at).await;
        assert!(
            total_runs(&runs) < JOBS,
            "restart {} came too late: every job already ran",
            round + 1
        );
        server.kill();
        tokio::time::sleep(Duration::from_millis(400)).await;
        server.spawn().await;
        wait_for_wakeups(&url, &mut events).await;
    }

    let what = format!("all {JOBS} jobs completed");
    let all_completed = eventually(120, &what, || {
        let s = s.clone();
        async move {
            let n = s.count(&JobFilter::state(JobState::Completed)).await.ok()?;
            (n == JOBS as u64).then_some(())
        }
    });
    if let Err(panic) = AssertUnwindSafe(all_completed).catch_unwind().await {
        report_unfinished(&s, &runs).await;
        std::panic::resume_unwind(panic);
    }
    shutdown.cancel();
    handle
        .await
        .expect("worker task did not panic")
        .expect("worker shut down cleanly");

    let mut found = HashMap::new();
    for chunk in ids.chunks(1000) {
        let page = s
            .list(
                &JobFilter {
                    ids: chunk.to_vec(),
                    ..JobFilter::default()
                },
                Page {
                    before: None,
                    limit: 1000,
                },
            )
            .await
            .unwrap();
        for job in page {
            found.insert(job.id, job);
        }
    }
    let missing: Vec<_> = ids.iter().filter(|id| !found.contains_key(id)).collect();
    assert!(
        missing.is_empty(),
        "jobs missing after the restarts: {missing:?}"
    );
    let runs = runs.lock().unwrap().clone();
    let mut ran_twice = 0;
    for id in &ids {
        let job = &found[id];
        assert_eq!(job.state, JobState::Completed, "job {id}: {job:?}");
        let completions = job
            .attempts
            .iter()
            .filter(|a| a.outcome == AttemptOutcome::Completed)
            .count();
        assert_eq!(
            completions, 1,
            "job {id} has {completions} completed outcomes: {:?}",
            job.attempts
        );
        let n = runs.get(id).copied().unwrap_or(0);
        assert!(n >= 1, "job {id} is completed but its handler never ran");
        if n > 1 {
            ran_twice += 1;
            eprintln!(
                "job {id}: handler ran {n} times (attempt history: {:?})",
                job.attempts
            );
        }
    }
    assert_eq!(found.len(), JOBS);
    eprintln!("{JOBS} jobs completed once each; {ran_twice} handlers ran more than once");
    drop(observer);
    drop(server);
}
