//! Email throttles shared through the store: two workers, each with its own connection to
//! the store and its own SMTP pool (as two worker processes have), send to a real SMTP server
//! (`tests/smtp/server.py`, aiosmtpd) that holds each DATA for a while and records, for each
//! transaction, when it started and how many to the same domain were in progress. On SQLite,
//! Postgres and Redis: mail to a domain limited to a rate is spread over at least the time
//! that rate implies; mail to a domain limited to a concurrency never has more transactions
//! in progress; a transport's own limits hold the same way; every message is delivered
//! exactly once, and no throttled job uses an attempt.

use std::sync::Arc;
use std::time::Duration;

use conveyor_jobs::email::throttle::Throttle;
use conveyor_jobs::email::{self, EmailArgs, EmailConfig, Emails, MailboxArg, Security, Transport};
use conveyor_tests::smtp::SmtpServer;
use conveyor_tests::{TestStore, eventually};
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::store::{self, StoreOptions};
use conveyor_worker::{JobId, JobState, NewJob, Registry, RetryPolicy, Store};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct Running {
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<conveyor_worker::Result<()>>,
}

/// A worker with its own store connection and its own `Emails` (its own SMTP pools).
async fn start(url: &str, config: EmailConfig) -> Running {
    let store = store::connect(url, StoreOptions::default()).await.unwrap();
    let emails = Arc::new(
        Emails::with_env(
            store.clone(),
            config,
            &conveyor_tests::test_keyring(),
            &|_| None,
        )
        .unwrap(),
    );
    let mut registry = Registry::new();
    email::register(&mut registry, emails);
    let worker = Worker::new(
        store,
        registry,
        WorkerConfig {
            queues: vec![QueueConfig {
                name: "default".into(),
                concurrency: 8,
            }],
            poll_interval: Duration::from_millis(20),
            shutdown_grace: Duration::from_secs(5),
            ..WorkerConfig::default()
        },
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(worker.run(shutdown.clone()));
    Running { shutdown, handle }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

fn config(server: &SmtpServer) -> EmailConfig {
    let mut t = Transport::new("127.0.0.1");
    t.port = Some(server.port);
    t.security = Security::None;
    t.timeout = Some(Duration::from_secs(5));
    let mut c = EmailConfig::default();
    c.transports.insert("main".into(), t);
    c.retry = RetryPolicy {
        base: Duration::from_millis(50),
        factor: 1.0,
        max: Duration::from_millis(50),
        jitter: 0.0,
    };
    c
}

fn message(to: &str) -> EmailArgs {
    EmailArgs {
        from: "shop@example.com".into(),
        to: vec![MailboxArg::from(to)],
        subject: "Your receipt".into(),
        text: Some("Thanks.".into()),
        ..EmailArgs::default()
    }
}

/// The server's accepted RCPTs (`address`, `t`, `inflight`) to `domain`.
fn rcpts(server: &SmtpServer, domain: &str) -> Vec<Value> {
    server
        .events()
        .into_iter()
        .filter(|e| {
            e["event"] == "rcpt"
                && e["answer"] == "ok"
                && e["address"]
                    .as_str()
                    .is_some_and(|a| a.ends_with(&format!("@{domain}")))
        })
        .collect()
}

/// Enqueues one message to each address, runs two workers until every job is completed,
/// and checks each address received exactly one message and no job used an extra attempt.
async fn send_all(
    store: &Arc<dyn Store>,
    url: &str,
    config: EmailConfig,
    to: &[String],
    server: &SmtpServer,
) {
    let checker = Emails::checker(store.clone(), config.clone()).unwrap();
    let mut ids: Vec<JobId> = Vec::new();
    for address in to {
        let args = serde_json::to_value(message(address)).unwrap();
        checker.check_args(&args).unwrap();
        ids.push(
            store
                .enqueue(NewJob::new(email::KIND, args).max_attempts(3))
                .await
                .unwrap()
                .id,
        );
    }
    let a = start(url, config.clone()).await;
    let b = start(url, config).await;
    for id in ids {
        let job = eventually(60, &format!("job {id} to finish"), || {
            let store = store.clone();
            async move {
                let j = store.get(id).await.unwrap()?;
                matches!(j.state, JobState::Completed | JobState::Dead).then_some(j)
            }
        })
        .await;
        assert_eq!(job.state, JobState::Completed, "{:?}", job.attempts);
        // Snoozes do not use attempts: one counted attempt, the one that sent.
        assert_eq!(job.attempt, 1, "{:?}", job.attempts);
    }
    a.stop().await;
    b.stop().await;
    let mut got: Vec<String> = server
        .received()
        .iter()
        .map(|r| r.rcpt_tos[0].clone())
        .collect();
    got.sort();
    let mut want = to.to_vec();
    want.sort();
    assert_eq!(got, want, "each message delivered exactly once");
}

mod sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn domain_throttles_hold_across_two_workers() {
        let t = conveyor_tests::TestStore::sqlite().await;
        super::throttles(&t).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transport_throttle_holds_across_two_workers() {
        let t = conveyor_tests::TestStore::sqlite().await;
        super::transport_throttle(&t).await;
    }
}

mod postgres {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn domain_throttles_hold_across_two_workers() {
        let Some(t) = conveyor_tests::TestStore::postgres().await else {
            return;
        };
        super::throttles(&t).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transport_throttle_holds_across_two_workers() {
        let Some(t) = conveyor_tests::TestStore::postgres().await else {
            return;
        };
        super::transport_throttle(&t).await;
    }
}

mod redis {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn domain_throttles_hold_across_two_workers() {
        let Some(t) = conveyor_tests::TestStore::redis().await else {
            return;
        };
        super::throttles(&t).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transport_throttle_holds_across_two_workers() {
        let Some(t) = conveyor_tests::TestStore::redis().await else {
            return;
        };
        super::transport_throttle(&t).await;
    }
}

/// `rate.example` at 5/s (burst 1), `busy.example` at 2 in progress, `free.example` with no
/// limit, each DATA held 0.3 s by the server.
async fn throttles(t: &TestStore) {
    let Some(server) = SmtpServer::start(json!({"data_delay": 0.3})) else {
        return;
    };
    let mut c = config(&server);
    c.throttles.insert(
        "rate.example".into(),
        Throttle {
            rate_per_second: Some(5.0),
            burst: None,
            concurrency: None,
        },
    );
    c.throttles.insert(
        "busy.example".into(),
        Throttle {
            rate_per_second: None,
            burst: None,
            concurrency: Some(2),
        },
    );
    let mut to = Vec::new();
    for i in 0..8 {
        to.push(format!("r{i}@rate.example"));
        to.push(format!("b{i}@busy.example"));
        to.push(format!("f{i}@free.example"));
    }
    send_all(&t.store, &t.url, c, &to, &server).await;

    // The rate: 8 transactions at 5/s with a burst of 1 start over at least 7 × 0.2 s.
    let times: Vec<f64> = rcpts(&server, "rate.example")
        .iter()
        .map(|e| e["t"].as_f64().unwrap())
        .collect();
    assert_eq!(times.len(), 8);
    let span = times.iter().cloned().fold(f64::MIN, f64::max)
        - times.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        span >= 1.4 * 0.9,
        "8 messages at 5/s started within {span:.3}s"
    );
    // The concurrency: never more than 2 to busy.example at once, and 2 reached.
    let most = |domain: &str| {
        rcpts(&server, domain)
            .iter()
            .map(|e| e["inflight"].as_i64().unwrap())
            .max()
            .unwrap()
    };
    assert_eq!(
        most("busy.example"),
        2,
        "{:?}",
        rcpts(&server, "busy.example")
    );
    // Without a limit the two workers do overlap (so the limit above is what held it).
    assert!(
        most("free.example") > 2,
        "{:?}",
        rcpts(&server, "free.example")
    );
    // Every slot was given back.
    let slots = conveyor_worker::store::meta::list_all(t.store.as_ref(), email::throttle::SLOTS)
        .await
        .unwrap();
    assert!(slots.is_empty(), "{slots:?}");
}

/// A transport at 1 in progress and 10/s: 6 messages to different domains, never two at once,
/// over at least 0.5 s.
async fn transport_throttle(t: &TestStore) {
    let Some(server) = SmtpServer::start(json!({"data_delay": 0.1})) else {
        return;
    };
    let mut c = config(&server);
    let main = c.transports.get_mut("main").unwrap();
    main.concurrency = Some(1);
    main.rate_per_second = Some(10.0);
    let to: Vec<String> = (0..6).map(|i| format!("u@d{i}.example")).collect();
    send_all(&t.store, &t.url, c, &to, &server).await;
    let events: Vec<Value> = server
        .events()
        .into_iter()
        .filter(|e| e["event"] == "rcpt" || e["event"] == "data")
        .collect();
    // Transactions never overlap: each RCPT comes after the previous DATA ended.
    let mut open = 0;
    for e in &events {
        if e["event"] == "rcpt" {
            open += 1;
        } else {
            open -= 1;
        }
        assert!(open <= 1, "two transactions at once: {events:?}");
    }
    let times: Vec<f64> = events
        .iter()
        .filter(|e| e["event"] == "rcpt")
        .map(|e| e["t"].as_f64().unwrap())
        .collect();
    assert!(times.last().unwrap() - times[0] >= 0.5 * 0.9, "{times:?}");
}
