//! TLS to the stores, and Postgres server settings Conveyor does not control.
//!
//! - Postgres over TLS against the tests' server: `sslmode=require`, `verify-full` with the
//!   right CA, and `verify-full` with a wrong CA or a host the certificate does not name, which
//!   fail with an error that says what to change.
//! - Redis over TLS against a private `redis-server --tls-port` with certificates made by the
//!   test: a CA file, a client certificate the server requires, a wrong CA.
//! - A Postgres database whose defaults are `serializable` with short timeouts: a burst of
//!   concurrent workers completes every job once, without serialization errors.
//!
//! The main flows of the conformance and runtime suites also run over TLS and on the strict
//! database (`production_backend_tests!`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_tests::tls::{CertPostgres, Certs, TlsRedis, local_pg_ca, pg_tls_url};
use conveyor_tests::{TestStore, unavailable};
use conveyor_worker::store::{self, JobFilter, StoreOptions};
use conveyor_worker::{AttemptOutcome, JobId, JobState, NewJob, Store};
use serde_json::json;

/// Enqueue, fetch, complete and read back one job: the store works end to end.
async fn round_trip(store: &Arc<dyn Store>) {
    let job = store
        .enqueue(NewJob::new("tls", json!({"n": 1})))
        .await
        .expect("enqueue works");
    let got = store
        .fetch(store::FetchRequest {
            queue: "default",
            limit: 1,
            worker: "w1",
            lease: Duration::from_secs(30),
        })
        .await
        .expect("fetch works");
    assert_eq!(got.len(), 1);
    let j = &got[0];
    let now = chrono::Utc::now();
    let applied = store
        .finish(vec![store::Finish {
            id: j.id,
            attempt: j.attempt,
            state: JobState::Completed,
            run_at: None,
            attempt_delta: 0,
            record: conveyor_worker::AttemptRecord {
                attempt: j.attempt,
                started_at: now,
                finished_at: now,
                outcome: AttemptOutcome::Completed,
                error: None,
                causes: vec![],
                worker: Some("w1".into()),
                duration_ms: 0,
                traceback: None,
            },
            result: None,
        }])
        .await
        .expect("finish works");
    assert_eq!(applied, 1);
    let done = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Completed);
}

/// A fresh empty database on the tests' server (dropped when the returned store is).
async fn empty_database() -> Option<TestStore> {
    TestStore::postgres().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sslmode_require_works() {
    let Some(t) = empty_database().await else {
        return;
    };
    let sep = if t.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{sep}sslmode=require", t.url);
    let s = store::connect(&url, StoreOptions::default())
        .await
        .unwrap_or_else(|e| panic!("sslmode=require connects: {e}"));
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&connect_pg(&url).await)
        .await
        .unwrap();
    assert!(ssl, "the connection is encrypted");
    round_trip(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_verify_full_with_the_right_ca_works() {
    let Some(t) = empty_database().await else {
        return;
    };
    if local_pg_ca().is_none() {
        unavailable::<()>(
            "the tests' Postgres is not this machine's (or has no /etc/ssl/certs/ssl-cert-snakeoil.pem): its CA is unknown",
        );
        return;
    }
    let url = pg_tls_url(&t.url);
    assert!(url.contains("verify-full"), "{url}");
    let s = store::connect(&url, StoreOptions::default())
        .await
        .unwrap_or_else(|e| panic!("verify-full with the server's CA connects: {e}"));
    round_trip(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_verify_full_with_a_wrong_ca_or_host_fails_clearly() {
    let Some(t) = empty_database().await else {
        return;
    };
    let Some(certs) = Certs::generate() else {
        return;
    };
    let sep = if t.url.contains('?') { '&' } else { '?' };
    let wrong_ca = format!(
        "{}{sep}sslmode=verify-full&sslrootcert={}",
        t.url.replacen("@127.0.0.1:", "@localhost:", 1),
        certs.path("other-ca.pem").display()
    );
    let e = match store::connect(&wrong_ca, StoreOptions::default()).await {
        Ok(_) => panic!("a server certificate the CA did not sign is refused"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("sslrootcert"), "the error says what to set: {e}");
    assert!(
        e.contains("certificate"),
        "the error says the certificate was refused: {e}"
    );
    if let Some(ca) = local_pg_ca() {
        // The right CA, but a host the certificate does not name.
        let wrong_host = format!(
            "{}{sep}sslmode=verify-full&sslrootcert={}",
            t.url.replacen("@localhost:", "@127.0.0.1:", 1),
            ca.display()
        );
        let e = match store::connect(&wrong_host, StoreOptions::default()).await {
            Ok(_) => panic!("verify-full refuses a host the certificate does not name"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("does not name the host") && e.contains("not valid for name"),
            "{e}"
        );
        // verify-ca checks the signature only, so the same URL passes.
        let verify_ca = wrong_host.replace("verify-full", "verify-ca");
        store::connect(&verify_ca, StoreOptions::default())
            .await
            .unwrap_or_else(|e| panic!("verify-ca with the server's CA connects: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_verify_full_with_a_client_certificate() {
    // A private cluster that takes only TLS connections with a client certificate.
    let Some(server) = tokio::task::spawn_blocking(CertPostgres::start)
        .await
        .expect("the cluster starts without panicking")
    else {
        return;
    };
    let s = store::connect(&server.url(true), StoreOptions::default())
        .await
        .unwrap_or_else(|e| panic!("verify-full with a client certificate connects: {e}"));
    round_trip(&s).await;
    let e = match store::connect(&server.url(false), StoreOptions::default()).await {
        Ok(_) => panic!("a client without a certificate is refused"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("certificate"), "{e}");
    drop(s);
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_ca_file_and_a_client_certificate() {
    let Some(server) = TlsRedis::start(true).await else {
        return;
    };
    let c = &server.certs;
    let url = server.url(&[
        ("tls_ca_file", &c.path("ca.pem")),
        ("tls_cert_file", &c.path("client.pem")),
        ("tls_key_file", &c.path("client.key")),
    ]);
    let s = store::connect(&format!("{url}&prefix=tls"), StoreOptions::default())
        .await
        .unwrap_or_else(|e| panic!("rediss:// with the CA and a client certificate opens: {e}"));
    round_trip(&s).await;
    assert!(s.backend_name().await.unwrap().contains("Redis"));

    // Without the client certificate the server refuses the connection.
    let no_cert = server.url(&[("tls_ca_file", &c.path("ca.pem"))]);
    let connect = tokio::time::timeout(
        Duration::from_secs(15),
        store::connect(&no_cert, StoreOptions::default()),
    )
    .await
    .expect("a refused connection fails within 15 s");
    assert!(
        connect.is_err(),
        "a client without a certificate is refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_wrong_ca_fails_clearly() {
    let Some(server) = TlsRedis::start(false).await else {
        return;
    };
    let url = server.url(&[("tls_ca_file", &server.certs.path("other-ca.pem"))]);
    let e = match tokio::time::timeout(
        Duration::from_secs(15),
        store::connect(&url, StoreOptions::default()),
    )
    .await
    .expect("a refused certificate fails within 15 s")
    {
        Ok(_) => panic!("a server certificate the CA did not sign is refused"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("tls_ca_file"), "the error says what to set: {e}");
    assert!(e.contains("certificate"), "{e}");

    // The CA parameters need rediss://.
    let plain = url.replacen("rediss://", "redis://", 1);
    let e = match store::connect(&plain, StoreOptions::default()).await {
        Ok(_) => panic!("tls_ca_file on redis:// is refused"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("rediss://"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_database_defaults_do_not_break_concurrent_workers() {
    let Some(t) = TestStore::postgres_strict().await else {
        return;
    };
    // A connection that does not set Conveyor's session settings sees the strict default.
    let plain: String = sqlx::query_scalar("SHOW default_transaction_isolation")
        .fetch_one(&connect_pg(&t.url).await)
        .await
        .unwrap();
    assert_eq!(plain, "serializable", "the database default is in force");
    burst(t.store.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serialization_failures_are_retried_when_session_settings_are_off() {
    // As behind a transaction-mode pooler: Conveyor sets nothing per connection, so its
    // statements run serializable and abort each other; the store retries them.
    let Some(t) =
        TestStore::postgres_with(&["default_transaction_isolation = 'serializable'"], |url| {
            url.to_string()
        })
        .await
    else {
        return;
    };
    let mut options = StoreOptions {
        max_connections: 8,
        ..StoreOptions::default()
    };
    options.pg_session = None;
    let s = store::connect(&t.url, options)
        .await
        .expect("the database opens");
    burst(s).await;
}

/// Concurrent enqueuers, fetch-and-complete loops and a rescuer; every store call must
/// succeed (the runtime would retry a failed one and hide it), every job runs once.
async fn burst(s: Arc<dyn Store>) {
    const JOBS: usize = 1200;
    const ENQUEUERS: usize = 12;
    let mut tasks = Vec::new();
    for e in 0..ENQUEUERS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for chunk in 0..(JOBS / ENQUEUERS / 10) {
                let jobs = (0..10)
                    .map(|i| NewJob::new("burst", json!({ "e": e, "c": chunk, "i": i })))
                    .collect();
                s.enqueue_many(jobs)
                    .await
                    .expect("enqueue under strict defaults works");
            }
        }));
    }
    let runs = Arc::new(Mutex::new(HashMap::<JobId, usize>::new()));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for w in 0..6 {
        let (s, runs, done) = (s.clone(), runs.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let worker = format!("worker-{w}");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while done.load(std::sync::atomic::Ordering::SeqCst) < JOBS {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the burst finishes within 20 s"
                );
                let jobs = s
                    .fetch(store::FetchRequest {
                        queue: "default",
                        limit: 10,
                        worker: &worker,
                        lease: Duration::from_secs(30),
                    })
                    .await
                    .expect("fetch under strict defaults works");
                if jobs.is_empty() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                let now = chrono::Utc::now();
                let outcomes: Vec<store::Finish> =
                    jobs.iter().map(|j| completed(j, &worker, now)).collect();
                for j in &jobs {
                    *runs.lock().unwrap().entry(j.id).or_default() += 1;
                }
                let applied = s
                    .finish(outcomes)
                    .await
                    .expect("completion under strict defaults works");
                assert_eq!(applied as usize, jobs.len());
                done.fetch_add(jobs.len(), std::sync::atomic::Ordering::SeqCst);
            }
        }));
    }
    {
        // The rescuer scans running jobs while they are claimed and completed.
        let (s, done) = (s.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while done.load(std::sync::atomic::Ordering::SeqCst) < JOBS {
                s.rescue_expired(chrono::Utc::now(), &Default::default(), 100)
                    .await
                    .expect("rescue under strict defaults works");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("no store call failed");
    }
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), JOBS);
    assert!(runs.values().all(|&n| n == 1), "no job ran twice");
    let completed = s
        .count(&JobFilter::state(JobState::Completed))
        .await
        .unwrap();
    assert_eq!(completed as usize, JOBS);
}

fn completed(
    j: &conveyor_worker::Job,
    worker: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> store::Finish {
    store::Finish {
        id: j.id,
        attempt: j.attempt,
        state: JobState::Completed,
        run_at: None,
        attempt_delta: 0,
        record: conveyor_worker::AttemptRecord {
            attempt: j.attempt,
            started_at: now,
            finished_at: now,
            worker: Some(worker.into()),
            outcome: AttemptOutcome::Completed,
            error: None,
            causes: vec![],
            duration_ms: 0,
            traceback: None,
        },
        result: None,
    }
}

/// A one-connection pool on `url` that does not set Conveyor's session settings.
async fn connect_pg(url: &str) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .expect("the test database is reachable")
}
