//! Workers whose clocks disagree with the store's, on Postgres and on Redis: real `conveyor`
//! processes, two of them under libfaketime (one 60 s behind, one 90 s ahead), beside one with
//! the true clock, all on one store. Every instant another process compares (leases, due
//! times, rescue) must come from the store's clock: no job runs twice because a skewed worker
//! handed out leases everyone else saw as expired, none runs before it is due.
//!
//! libfaketime is preloaded into the `conveyor` process itself (not through the `faketime`
//! wrapper, which forks and leaves its child behind when killed), and monotonic clocks stay
//! real so tokio's timers behave. Processes are stopped with SIGKILL (dropping a `Process`).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use common::{Process, conveyor, run_json};
use conveyor_tests::{TestStore, eventually, unavailable};
use conveyor_worker::store::JobFilter;
use conveyor_worker::{AttemptOutcome, JobId, JobState, NewJob, Store};

/// The libfaketime library to preload, or `None` (skip, or fail under CI) when it is missing.
fn faketime_lib() -> Option<PathBuf> {
    let found = ["libfaketimeMT.so.1", "libfaketime.so.1"]
        .iter()
        .flat_map(|lib| {
            [
                "/usr/lib/x86_64-linux-gnu/faketime",
                "/usr/lib/aarch64-linux-gnu/faketime",
                "/usr/lib/faketime",
                "/usr/local/lib/faketime",
            ]
            .map(|dir| PathBuf::from(dir).join(lib))
        })
        .find(|p| p.exists());
    found.or_else(|| {
        unavailable("libfaketime is not installed (Debian: apt-get install faketime; scripts/test-deps.sh does it)")
    })
}

/// `conveyor args…` whose wall clock is shifted by `shift` (libfaketime syntax: `-60s`).
fn skewed(lib: &PathBuf, url: &str, shift: &str, args: &[&str]) -> Command {
    let mut c = conveyor(url, args);
    c.env("LD_PRELOAD", lib)
        .env("FAKETIME", shift)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("FAKETIME_NO_CACHE", "1");
    c
}

/// A worker (with the maintenance services) whose leases are short and whose rescuer looks
/// often, so a wrongly expired lease is rescued within the test.
fn worker(mut c: Command, id: &str) -> Process {
    c.env("CONVEYOR_WORKER__ID", id)
        .env("CONVEYOR_WORKER__LEASE", "4s")
        .env("CONVEYOR_WORKER__HEARTBEAT", "1s")
        .env("CONVEYOR_WORKER__POLL_INTERVAL", "100ms")
        .env("CONVEYOR_MAINTENANCE__RESCUER__INTERVAL", "200ms")
        .env("CONVEYOR_MAINTENANCE__PROMOTER__INTERVAL", "200ms")
        .env("CONVEYOR_MAINTENANCE__RESCUER__RETRY__BASE", "100ms")
        .env("CONVEYOR_MAINTENANCE__RESCUER__RETRY__JITTER", "0");
    let mut p = Process::spawn(c);
    p.wait_for_line("worker started", 20);
    p
}

macro_rules! skew_tests {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(lib) = super::faketime_lib() else { return };
                    let Some(t) = conveyor_tests::TestStore::postgres().await else { return };
                    super::$name(&lib, &t).await;
                    t.cleanup().await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(lib) = super::faketime_lib() else { return };
                    let Some(t) = conveyor_tests::TestStore::redis().await else { return };
                    super::$name(&lib, &t).await;
                    t.cleanup().await;
                }
            )*
        }
    };
}

skew_tests!(
    workers_with_skewed_clocks_run_each_job_once,
    a_delayed_job_waits_for_the_store_clock,
);

async fn workers_with_skewed_clocks_run_each_job_once(lib: &PathBuf, t: &TestStore) {
    let url = t.url.as_str();
    let store: Arc<dyn Store> = t.store.clone();
    let _normal = worker(conveyor(url, &["worker"]), "on-time");
    let _behind = worker(skewed(lib, url, "-60s", &["worker"]), "behind");
    let _ahead = worker(skewed(lib, url, "+90s", &["worker"]), "ahead");

    // Three workers of ten slots each, 100 jobs of 400 ms: every worker runs a share, and
    // each job runs long enough for a rescuer pass (every 200 ms) to see its lease.
    let jobs: Vec<NewJob> = (0..100)
        .map(|_| NewJob::new("demo.sleep", serde_json::json!({ "ms": 400 })))
        .collect();
    let ids: Vec<JobId> = store
        .enqueue_many(jobs)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();

    let s = store.clone();
    eventually(60, "all 100 jobs finish", || {
        let s = s.clone();
        async move {
            let done = s
                .count(&JobFilter {
                    states: vec![JobState::Completed, JobState::Dead, JobState::Cancelled],
                    ..JobFilter::default()
                })
                .await
                .unwrap();
            (done == 100).then_some(())
        }
    })
    .await;

    // The test runs on the store's machine: its clock is the store's.
    let store_now = chrono::Utc::now();
    let mut by_worker = std::collections::BTreeMap::<String, usize>::new();
    let mut twice = Vec::new();
    let mut mistimed = Vec::new();
    for id in &ids {
        let job = store.get(*id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Completed, "{job:?}");
        if job.attempts.len() != 1
            || job
                .attempts
                .iter()
                .any(|a| a.outcome == AttemptOutcome::LeaseExpired)
        {
            twice.push(job.attempts.clone());
            continue;
        }
        let a = &job.attempts[0];
        // The attempt's times are on the store's clock, whichever machine ran it.
        if a.duration_ms > 10_000 || a.finished_at > store_now + chrono::Duration::seconds(5) {
            mistimed.push(a.clone());
        }
        *by_worker
            .entry(a.worker.clone().unwrap_or_default())
            .or_default() += 1;
    }
    assert!(
        twice.is_empty(),
        "{} of 100 jobs ran more than once (their lease looked expired to another process); first: {:?}",
        twice.len(),
        twice.first()
    );
    assert!(
        mistimed.is_empty(),
        "{} attempts were timed on a skewed clock (store now {store_now}); first: {:?}",
        mistimed.len(),
        mistimed.first()
    );
    // Each worker's registration expires one lease after its last heartbeat on the store's
    // clock: neither hidden at once (behind) nor kept long after the worker is gone (ahead).
    let records = conveyor_worker::store::meta::list_all(store.as_ref(), "workers")
        .await
        .unwrap();
    let store_now = chrono::Utc::now();
    let mut listed = Vec::new();
    for r in &records {
        let left = r.expires_at.map(|e| (e - store_now).num_milliseconds());
        assert!(
            left.is_some_and(|ms| (0..=6_000).contains(&ms)),
            "registration of {} expires {left:?} ms from now on the store's clock (lease 4 s)",
            r.key
        );
        listed.push(r.key.clone());
    }
    listed.sort();
    assert_eq!(listed, ["ahead", "behind", "on-time"]);
    for w in ["behind", "ahead"] {
        assert!(
            by_worker.get(w).copied().unwrap_or(0) > 0,
            "the {w} worker ran no job, so the test proved nothing: {by_worker:?}"
        );
    }
}

async fn a_delayed_job_waits_for_the_store_clock(lib: &PathBuf, t: &TestStore) {
    let url = t.url.as_str();
    let store: Arc<dyn Store> = t.store.clone();
    // Only a worker whose clock is 90 s ahead runs jobs here.
    let _ahead = worker(skewed(lib, url, "+90s", &["worker"]), "ahead");

    // Enqueued from a machine 60 s behind: "in 30 s" means 30 s on the store's clock, not
    // 30 s after that machine's time (which the store sees as 30 s ago).
    let out = tokio::task::block_in_place(|| {
        skewed(
            lib,
            url,
            "-60s",
            &[
                "enqueue",
                "--kind",
                "demo.sleep",
                "--args",
                r#"{"ms":1}"#,
                "--delay",
                "30s",
                "--json",
            ],
        )
        .output()
        .expect("the binary runs")
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let delayed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let delayed: JobId = delayed["id"].as_str().unwrap().parse().unwrap();
    // The test runs on the store's machine: its clock is the store's.
    let store_now = chrono::Utc::now();
    let due_in = |job: &conveyor_worker::Job| (job.run_at - store_now).num_seconds();
    // And one due in 30 s by the store's clock, given as a time.
    let at = store
        .enqueue(
            NewJob::new("demo.sleep", serde_json::json!({ "ms": 1 }))
                .run_at(store_now + chrono::Duration::seconds(30)),
        )
        .await
        .unwrap()
        .id;

    // A job due now, enqueued after the delayed one: once the ahead worker has run it, it has
    // fetched with both jobs in the store, and must have left the delayed one alone.
    let now_job = run_json(
        url,
        &["enqueue", "--kind", "demo.sleep", "--args", r#"{"ms":1}"#],
    );
    let now_job: JobId = now_job["id"].as_str().unwrap().parse().unwrap();
    let s = store.clone();
    eventually(20, "the job due now completes", || {
        let s = s.clone();
        async move { (s.get(now_job).await.unwrap()?.state == JobState::Completed).then_some(()) }
    })
    .await;
    // One more promoter and fetch round of the ahead worker (both every 100-200 ms).
    let s = store.clone();
    let mut rounds = 0;
    eventually(5, "a few more rounds of the ahead worker", || {
        rounds += 1;
        let s = s.clone();
        let enough = rounds >= 50; // 50 polls of 20 ms: a second
        async move {
            for id in [delayed, at] {
                let job = s.get(id).await.unwrap()?;
                assert_eq!(
                    job.state,
                    JobState::Scheduled,
                    "a worker whose clock is ahead ran a job {} s before it was due: {job:?}",
                    due_in(&job)
                );
            }
            enough.then_some(())
        }
    })
    .await;
    let job = store.get(delayed).await.unwrap().unwrap();
    assert!(
        (20..=31).contains(&due_in(&job)),
        "a 30 s delay from a clock 60 s behind is due in {} s on the store's clock: {job:?}",
        due_in(&job)
    );
}
