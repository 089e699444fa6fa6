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
//! The conformance and runtime suites also run over TLS and on the strict database
//! (`production_backend_tests!`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_tests::tls::{Certs, TlsRedis, local_pg_ca, pg_tls_url};
use conveyor_tests::{TestStore, eventually, unavailable};
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::store::{self, JobFilter, StoreOptions};
use conveyor_worker::{
    AttemptOutcome, JobContext, JobId, JobState, NewJob, Outcome, Registry, Store,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

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
            },
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
    let s = t.store.clone();
    let runs = Arc::new(Mutex::new(HashMap::<JobId, usize>::new()));
    let mut workers = Vec::new();
    for w in 0..4 {
        let mut registry = Registry::new();
        let runs = runs.clone();
        registry.register("burst", move |_: serde_json::Value, ctx: JobContext| {
            let runs = runs.clone();
            async move {
                *runs.lock().unwrap().entry(ctx.job.id).or_default() += 1;
                Ok(Outcome::Done)
            }
        });
        let config = WorkerConfig {
            id: format!("worker-{w}"),
            queues: vec![QueueConfig {
                name: "default".into(),
                concurrency: 8,
            }],
            poll_interval: Duration::from_millis(100),
            ..WorkerConfig::default()
        };
        let worker = Worker::new(s.clone(), registry, config).expect("valid config");
        let stop = CancellationToken::new();
        workers.push((stop.clone(), tokio::spawn(worker.run(stop))));
    }
    // Enqueues in parallel chunks while the workers fetch and complete.
    const JOBS: usize = 1200;
    let enqueues = futures::future::join_all((0..12).map(|_| {
        s.enqueue_many(
            (0..JOBS / 12)
                .map(|i| NewJob::new("burst", json!({ "i": i })))
                .collect(),
        )
    }))
    .await;
    for e in enqueues {
        e.expect("enqueue under strict defaults works");
    }
    eventually(20, "every job completed", || {
        let s = s.clone();
        async move {
            let n = s.count(&JobFilter::state(JobState::Completed)).await.ok()?;
            (n as usize == JOBS).then_some(())
        }
    })
    .await;
    for (stop, handle) in workers {
        stop.cancel();
        handle
            .await
            .expect("worker task did not panic")
            .expect("worker shut down cleanly");
    }
    let runs = runs.lock().unwrap();
    assert_eq!(runs.len(), JOBS);
    assert!(runs.values().all(|&n| n == 1), "no job ran twice");
    // Nothing was retried: no attempt failed.
    let retried = s
        .count(&JobFilter {
            error_contains: Some("serialize".into()),
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(retried, 0);
}

/// A one-connection pool on `url` that does not set Conveyor's session settings.
async fn connect_pg(url: &str) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .expect("the test database is reachable")
}
