//! Redis only: a worker keeps going when its Redis server restarts mid-run. The test runs a
//! private `redis-server` (never the shared one other tests use) with an fsynced append-only
//! file, kills it with SIGKILL twice while thousands of jobs are being processed, restarts it
//! on the same port and directory, and checks that every job ends `completed` with exactly one
//! `completed` outcome in its history, and that wake-ups flow again after each restart.

use std::collections::HashMap;
use std::net::TcpListener;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_tests::eventually;
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::store::{self, JobFilter, Page, StoreEvent, StoreOptions};
use conveyor_worker::{
    AttemptOutcome, JobContext, JobId, JobState, NewJob, Outcome, Registry, Store,
};
use futures::FutureExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const JOBS: usize = 4000;

/// A private Redis server on a free loopback port, with its data in a temp folder. Dropping it
/// kills the server and deletes the folder, so a failing test cleans up too.
struct PrivateRedis {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts one, or returns `None` (with the reason printed) when `redis-server` is not
    /// installed outside CI.
    async fn start() -> Option<PrivateRedis> {
        let Some(binary) = find_on_path("redis-server") else {
            return conveyor_tests::unavailable(
                "redis-server is not on PATH; install Redis to run this test",
            );
        };
        let dir = std::env::temp_dir().join(format!(
            "conveyor-redis-restart-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir is writable");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut server = PrivateRedis {
            binary,
            dir,
            port,
            child: None,
        };
        server.spawn().await;
        Some(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts the server process and waits until it answers `PING`.
    async fn spawn(&mut self) {
        let child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", ""])
            .args(["--logfile", "redis.log"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        eventually(20, "the private Redis to answer PING", || {
            let client = client.clone();
            async move {
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                // A server still loading its append-only file answers `LOADING`.
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .ok()
                    .map(drop)
            }
        })
        .await;
    }

    /// SIGKILL: no shutdown save, no goodbye to clients.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

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
    let Some(mut server) = PrivateRedis::start().await else {
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
