//! Whole-process behaviour: health endpoints, graceful shutdown, and a worker killed with
//! SIGKILL mid-job (its lease expires, the rescuer counts the attempt, and a job that keeps
//! killing its workers ends `dead` instead of looping forever).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::{Process, conveyor, http_get, run_json};
use conveyor_tests::eventually;
use conveyor_worker::{AttemptOutcome, JobId, JobState, Store};
use nix::sys::signal::Signal;

cli_backend_tests!(
    serve_answers_health_checks_and_finishes_running_jobs_on_sigterm,
    a_worker_process_serves_probes_and_metrics_on_the_metrics_listener,
    a_job_that_kills_its_workers_ends_dead,
);

/// A process without the `api` role (as deploy/ runs the worker and scheduler roles) serves
/// `/livez`, `/readyz` and `/metrics` on `api.metrics.listen`, and `conveyor health` (the
/// image's healthcheck) checks them.
async fn a_worker_process_serves_probes_and_metrics_on_the_metrics_listener(
    url: String,
    _store: Arc<dyn Store>,
) {
    let mut worker = Process::spawn({
        let mut c = conveyor(&url, &["serve", "--roles", "worker,scheduler"]);
        c.env("CONVEYOR_API__METRICS__LISTEN", "127.0.0.1:0");
        c
    });
    let line = worker.wait_for_line("metrics, /livez and /readyz on http://", 20);
    let addr: SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| {
            a.trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("an address in: {line}"));
    let health =
        |path: &str| common::run(&url, &["health", "--url", &format!("http://{addr}{path}")]);
    let (code, out, err) = health("/livez");
    assert_eq!((code, out.trim()), (0, "ok"), "{err}");
    let (code, out, err) = health("/readyz");
    assert_eq!((code, out.trim()), (0, "ready"), "{err}");
    let (code, _, err) = health("/v1/jobs");
    assert_eq!(code, 1, "the API is not on this listener: {err}");
    assert!(err.contains("404"), "{err}");
    let (code, _, err) = common::run(
        &url,
        &[
            "health",
            "--url",
            "http://127.0.0.1:9/livez",
            "--timeout",
            "1s",
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no answer from http://127.0.0.1:9/livez"),
        "{err}"
    );

    let text = eventually(10, "the worker shows on its own /metrics", || async {
        let (status, body) = tokio::task::block_in_place(|| http_get(addr, "/metrics"));
        (status == 200 && body.contains("conveyor_queue_live_workers{queue=\"default\"} 1"))
            .then_some(body)
    })
    .await;
    assert!(text.contains("conveyor_store_up 1"), "{text}");
    assert!(
        text.contains("# TYPE conveyor_cron_fires_total counter"),
        "{text}"
    );
    assert_eq!(worker.stop(Signal::SIGTERM, 20), Some(0));
}

async fn serve_answers_health_checks_and_finishes_running_jobs_on_sigterm(
    url: String,
    store: Arc<dyn Store>,
) {
    let mut serve = Process::spawn({
        let mut c = conveyor(&url, &["serve", "--listen", "127.0.0.1:0"]);
        c.env("CONVEYOR_WORKER__POLL_INTERVAL", "100ms");
        c
    });
    let line = serve.wait_for_line("listening on http://", 20);
    let addr: SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("an address in: {line}"));
    serve.wait_for_line("worker started", 20);

    let (status, body) = tokio::task::block_in_place(|| http_get(addr, "/livez"));
    assert_eq!(status, 200, "{body}");
    let (status, body) = tokio::task::block_in_place(|| http_get(addr, "/readyz"));
    assert_eq!((status, body.trim()), (200, "ready"));

    // A schema older than the binary (here: the migration record removed) is not ready, and
    // says why and what to run; putting the record back makes it ready again.
    set_migration_record(&url, false).await;
    let (status, body) = tokio::task::block_in_place(|| http_get(addr, "/readyz"));
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("migrations pending") && body.contains("conveyor migrate"),
        "{body}"
    );
    let (status, _) = tokio::task::block_in_place(|| http_get(addr, "/livez"));
    assert_eq!(status, 200, "liveness does not depend on the store");
    set_migration_record(&url, true).await;
    let (status, body) = tokio::task::block_in_place(|| http_get(addr, "/readyz"));
    assert_eq!((status, body.trim()), (200, "ready"));

    let job = run_json(
        &url,
        &[
            "enqueue",
            "--kind",
            "demo.sleep",
            "--args",
            r#"{"ms":3000}"#,
        ],
    );
    let id: JobId = job["id"].as_str().unwrap().parse().unwrap();
    let s = store.clone();
    eventually(20, "the job starts", || {
        let s = s.clone();
        async move { (s.get(id).await.unwrap()?.state == JobState::Running).then_some(()) }
    })
    .await;

    // SIGTERM while the job sleeps: while it finishes, the listener stays up and says it is
    // draining (`/readyz` 503, `/livez` 200); then the process exits 0.
    serve.signal(Signal::SIGTERM);
    serve.wait_for_line("shutdown requested", 10);
    let (status, body) = tokio::task::block_in_place(|| http_get(addr, "/readyz"));
    assert_eq!(
        (status, body.trim()),
        (503, "not ready: shutting down"),
        "{}",
        serve.seen.join("\n")
    );
    let (status, _) = tokio::task::block_in_place(|| http_get(addr, "/livez"));
    assert_eq!(status, 200, "alive while draining");
    let running = store.get(id).await.unwrap().unwrap();
    assert_eq!(
        running.state,
        JobState::Running,
        "the answers above came while the job ran"
    );
    assert_eq!(serve.wait_exit(30), Some(0), "{}", serve.seen.join("\n"));
    let job = store.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Completed, "{job:?}");
    assert!(serve.seen.iter().any(|l| l.contains("shut down cleanly")));
    // The listener is closed once the process is gone.
    assert!(std::net::TcpStream::connect(addr).is_err());
}

async fn a_job_that_kills_its_workers_ends_dead(url: String, store: Arc<dyn Store>) {
    // Short leases so an expiry comes quickly; a fast rescuer and retry backoff.
    let worker = |url: &str| {
        let mut c = conveyor(url, &["worker"]);
        c.env("CONVEYOR_WORKER__LEASE", "2s")
            .env("CONVEYOR_WORKER__HEARTBEAT", "500ms")
            .env("CONVEYOR_WORKER__POLL_INTERVAL", "100ms")
            .env("CONVEYOR_MAINTENANCE__RESCUER__INTERVAL", "200ms")
            .env("CONVEYOR_MAINTENANCE__RESCUER__RETRY__BASE", "100ms")
            .env("CONVEYOR_MAINTENANCE__RESCUER__RETRY__JITTER", "0");
        Process::spawn(c)
    };
    let job = run_json(
        &url,
        &[
            "enqueue",
            "--kind",
            "demo.sleep",
            "--args",
            r#"{"ms":600000}"#,
            "--max-attempts",
            "2",
        ],
    );
    let id: JobId = job["id"].as_str().unwrap().parse().unwrap();

    for attempt in 1..=2 {
        let mut w = worker(&url);
        let s = store.clone();
        let owner = eventually(30, "a worker claims the job", || {
            let s = s.clone();
            async move {
                let job = s.get(id).await.unwrap()?;
                (job.state == JobState::Running && job.attempt == attempt)
                    .then(|| job.lease_owner.clone().unwrap())
            }
        })
        .await;
        // The process dies mid-job without a chance to write anything back.
        assert_eq!(w.stop(Signal::SIGKILL, 10), None, "killed by a signal");
        let job = store.get(id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Running, "nobody has noticed yet");
        assert_eq!(job.lease_owner.as_deref(), Some(owner.as_str()));
    }

    // A healthy process's rescuer notices the expired lease; with no attempts left it is dead.
    let _rescuer = worker(&url);
    let s = store.clone();
    let job = eventually(30, "the rescuer ends the job", || {
        let s = s.clone();
        async move {
            let job = s.get(id).await.unwrap()?;
            (job.state == JobState::Dead).then_some(job)
        }
    })
    .await;
    assert_eq!(job.attempt, 2);
    let outcomes: Vec<_> = job.attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(
        outcomes,
        [AttemptOutcome::LeaseExpired, AttemptOutcome::LeaseExpired]
    );
    assert!(
        job.attempts[0]
            .error
            .as_deref()
            .unwrap()
            .contains("stopped heartbeating"),
        "{:?}",
        job.attempts[0]
    );
}

/// Hides (`present = false`) or restores the record of the latest applied migration.
async fn set_migration_record(url: &str, present: bool) {
    use sqlx::Connection;
    let sql = if present {
        "UPDATE _sqlx_migrations SET success = true"
    } else {
        "UPDATE _sqlx_migrations SET success = false"
    };
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut c).await.unwrap();
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut c).await.unwrap();
    }
}
