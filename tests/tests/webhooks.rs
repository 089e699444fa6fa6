//! Webhook delivery end to end, against a real HTTP receiver (an axum server on 127.0.0.1:0)
//! and every backend: signatures checked by an independent HMAC, the id stable across
//! retries, the retry schedule, `Retry-After`, permanent 4xx, timeouts and dropped
//! connections, the circuit breaker, the shared rate limit across two workers, the SSRF
//! guard (literal IPs, a name, a redirect), auto-disable, replay, idempotent events.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::Utc;
use conveyor_jobs::webhook::endpoint::{EndpointPatch, NewEndpoint};
use conveyor_jobs::webhook::event::SendEvent;
use conveyor_jobs::webhook::model::{AUDIT, EVENT_ENDPOINT_DISABLED};
use conveyor_jobs::webhook::{self, CircuitState, WebhookConfig, Webhooks};
use conveyor_tests::receiver::{Answer, Received, Receiver, closing_server};
use conveyor_tests::{backend_tests, eventually};
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::store::meta::MetaQuery;
use conveyor_worker::{Job, JobId, JobState, Registry, Store};
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

fn test_config() -> WebhookConfig {
    WebhookConfig {
        // The receiver is on loopback; tests of the guard use a config without this.
        allow_cidrs: vec!["127.0.0.0/8".parse().unwrap()],
        endpoint_cache: Duration::ZERO,
        health_flush: Duration::ZERO,
        timeout: Duration::from_secs(5),
        ..WebhookConfig::default()
    }
}

struct Running {
    webhooks: Arc<Webhooks>,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<conveyor_worker::Result<()>>,
}

impl Running {
    fn start(store: &Arc<dyn Store>, config: WebhookConfig) -> Running {
        let webhooks = Arc::new(
            Webhooks::new(store.clone(), config.clone())
                .unwrap()
                .with_keyring(conveyor_tests::test_keyring()),
        );
        let mut registry = Registry::new();
        webhook::register(&mut registry, webhooks.clone());
        let worker = Worker::new(
            store.clone(),
            registry,
            WorkerConfig {
                queues: vec![QueueConfig {
                    name: config.queue.clone(),
                    concurrency: 16,
                }],
                poll_interval: Duration::from_millis(20),
                shutdown_grace: Duration::from_secs(5),
                ..WorkerConfig::default()
            },
        )
        .unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        Running {
            webhooks,
            shutdown,
            handle,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

/// The Standard Webhooks signature, computed here with hmac/sha2 directly — not with the
/// function that signs.
fn expected_signature(secret: &str, r: &Received) -> String {
    let key = B64.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    let id = r.header("webhook-id").unwrap();
    let ts = r.header("webhook-timestamp").unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&r.body);
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

fn signed_by(secret: &str, r: &Received) -> bool {
    let want = expected_signature(secret, r);
    r.header("webhook-signature")
        .unwrap_or_default()
        .split(' ')
        .any(|s| s == want)
}

async fn job_in(store: &Arc<dyn Store>, id: &str, states: &[JobState]) -> Job {
    let id: JobId = id.parse().unwrap();
    eventually(30, &format!("delivery {id} to reach {states:?}"), || {
        let store = store.clone();
        async move {
            let j = store.get(id).await.unwrap()?;
            states.contains(&j.state).then_some(j)
        }
    })
    .await
}

async fn arrivals(rx: &Receiver, path: &str, n: usize) -> Vec<Received> {
    eventually(30, &format!("{n} requests on {path}"), || async {
        let got = rx.received(path);
        (got.len() >= n).then_some(got)
    })
    .await
}

fn endpoint(url: String) -> NewEndpoint {
    NewEndpoint {
        url,
        ..NewEndpoint::default()
    }
}

async fn signed_fan_out_with_idempotent_events(store: Arc<dyn Store>) {
    let rx = Receiver::start().await;
    let run = Running::start(&store, test_config());
    let hooks = &run.webhooks;
    let mut a = endpoint(rx.url("/a"));
    a.event_types = vec!["invoice.*".into()];
    a.headers.insert("x-tenant".into(), "acme".into());
    a.headers
        .insert("Authorization".into(), "Bearer receiver-token".into());
    let a = hooks.create_endpoint(a).await.unwrap();
    let mut b = endpoint(rx.url("/b"));
    b.event_types = vec!["user.created".into()];
    let b = hooks.create_endpoint(b).await.unwrap();
    let secret = a.secrets[0].secret.clone();
    assert!(secret.starts_with("whsec_"));

    let send = SendEvent {
        event_type: "invoice.paid".into(),
        payload: json!({"invoice": 42}),
        idempotency_key: Some("inv-42-paid".into()),
    };
    let first = hooks.send_event(send.clone()).await.unwrap();
    assert!(!first.duplicate);
    assert_eq!(
        first.event.deliveries.len(),
        1,
        "only /a subscribes to invoice.*"
    );
    let again = hooks.send_event(send).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.event.id, first.event.id);

    let job = job_in(
        &store,
        &first.event.deliveries[0].job_id,
        &[JobState::Completed],
    )
    .await;
    assert_eq!(job.attempt, 1);
    let got = rx.received("/a");
    assert_eq!(
        got.len(),
        1,
        "a duplicate event key made no second delivery"
    );
    assert!(rx.received("/b").is_empty());
    let r = &got[0];
    assert!(signed_by(&secret, r), "signature verifies independently");
    assert_eq!(r.header("webhook-id"), Some(first.event.id.as_str()));
    assert_eq!(r.header("x-tenant"), Some("acme"));
    assert_eq!(r.header("authorization"), Some("Bearer receiver-token"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["type"], "invoice.paid");
    assert_eq!(body["data"], json!({"invoice": 42}));
    // The shipped verifier agrees.
    let get = |n: &str| r.header(n).map(str::to_string);
    webhook::signature::verify(&secret, get, &r.body, Utc::now().timestamp(), 300).unwrap();

    // The attempt log, per endpoint and per event, without secrets.
    let page = hooks
        .attempts_for_endpoint(&a.id, &Default::default())
        .await
        .unwrap();
    assert_eq!(page.attempts.len(), 1);
    let logged = &page.attempts[0];
    assert_eq!(logged.status, Some(200));
    assert_eq!(logged.result, "delivered");
    assert_eq!(logged.response_body, "answer 200");
    assert!(logged.request_headers.contains_key("webhook-signature"));
    // The receiver's credential is hidden; other headers stay for debugging.
    assert_eq!(logged.request_headers["Authorization"], "***");
    assert_eq!(logged.request_headers["x-tenant"], "acme");
    assert!(
        !serde_json::to_string(logged)
            .unwrap()
            .contains("receiver-token")
    );
    assert!(
        !serde_json::to_string(logged)
            .unwrap()
            .contains(&secret[6..])
    );
    let by_event = hooks.attempts_for_event(&first.event.id).await.unwrap();
    assert_eq!(by_event.len(), 1);
    assert!(
        hooks
            .attempts_for_endpoint(&b.id, &Default::default())
            .await
            .unwrap()
            .attempts
            .is_empty()
    );

    // Health counts it.
    let health = hooks.health(&a.id).await.unwrap();
    assert_eq!(health.last_hour.attempts, 1);
    assert_eq!(health.last_hour.success_rate, Some(1.0));
    assert_eq!(health.circuit, CircuitState::Closed);

    // Rotation: both secrets sign during the overlap.
    let rotated = hooks.rotate_secret(&a.id, None, None).await.unwrap();
    let new_secret = rotated.secrets[0].secret.clone();
    assert_ne!(new_secret, secret);
    let sent = hooks
        .send_event(SendEvent {
            event_type: "invoice.sent".into(),
            payload: json!({}),
            idempotency_key: None,
        })
        .await
        .unwrap();
    job_in(
        &store,
        &sent.event.deliveries[0].job_id,
        &[JobState::Completed],
    )
    .await;
    let r = &rx.received("/a")[1];
    assert!(signed_by(&secret, r) && signed_by(&new_secret, r));

    // One-off delivery to a URL.
    let direct = hooks
        .send_to_url(&rx.url("/direct"), "ping", json!({"n": 1}))
        .await
        .unwrap();
    job_in(&store, &direct.deliveries[0].job_id, &[JobState::Completed]).await;
    assert_eq!(rx.received("/direct").len(), 1);
    run.stop().await;
}

async fn retries_keep_the_id_and_follow_the_schedule(store: Arc<dyn Store>) {
    // `conveyor_webhook_deliveries_total` by outcome (process-wide: other tests add to it).
    let attempts = |outcome: &str| {
        conveyor_worker::metrics::global()
            .webhook_deliveries
            .get(&[outcome])
            .get()
    };
    let (retried_before, delivered_before) = (attempts("retry"), attempts("delivered"));
    let rx = Receiver::start().await;
    let run = Running::start(&store, test_config());
    let hooks = &run.webhooks;
    let mut new = endpoint(rx.url("/flaky"));
    new.retry_schedule_ms = Some(vec![0, 300, 600, 600]);
    let ep = hooks.create_endpoint(new).await.unwrap();
    let secret = ep.secrets[0].secret.clone();
    rx.script("/flaky", [Answer::Status(500), Answer::Status(502)]);
    let sent = hooks
        .send_event(SendEvent {
            event_type: "order.created".into(),
            payload: json!({"order": 7}),
            idempotency_key: None,
        })
        .await
        .unwrap();
    let job = job_in(
        &store,
        &sent.event.deliveries[0].job_id,
        &[JobState::Completed],
    )
    .await;
    assert_eq!(job.attempt, 3);
    assert_eq!(job.max_attempts, 4, "attempts follow the schedule's length");
    let got = rx.received("/flaky");
    assert_eq!(got.len(), 3);
    for r in &got {
        assert_eq!(
            r.header("webhook-id"),
            Some(sent.event.id.as_str()),
            "stable id"
        );
        assert!(signed_by(&secret, r));
    }
    // ±10 % jitter, and a little for the poll interval on the late side only.
    let gap1 = got[1].at - got[0].at;
    let gap2 = got[2].at - got[1].at;
    assert!(gap1 >= Duration::from_millis(270), "{gap1:?}");
    assert!(gap2 >= Duration::from_millis(540), "{gap2:?}");
    let log = hooks.attempts_for_event(&sent.event.id).await.unwrap();
    let statuses: Vec<_> = log.iter().rev().map(|a| a.status).collect();
    assert_eq!(statuses, vec![Some(500), Some(502), Some(200)]);
    assert!(attempts("retry") >= retried_before + 2);
    assert!(attempts("delivered") > delivered_before);

    // The default schedule: after a first failure the next try is due 5 s (±10 %) later.
    let slow = hooks
        .create_endpoint(endpoint(rx.url("/down")))
        .await
        .unwrap();
    rx.default_answer("/down", Answer::Status(500));
    hooks
        .update_endpoint(
            &ep.id,
            EndpointPatch {
                event_types: Some(vec!["never".into()]),
                ..EndpointPatch::default()
            },
        )
        .await
        .unwrap();
    let sent = hooks
        .send_event(SendEvent {
            event_type: "order.created".into(),
            payload: json!({}),
            idempotency_key: None,
        })
        .await
        .unwrap();
    assert_eq!(sent.event.deliveries.len(), 1);
    assert_eq!(
        sent.event.deliveries[0].endpoint_id.as_deref(),
        Some(slow.id.as_str())
    );
    let job = job_in(
        &store,
        &sent.event.deliveries[0].job_id,
        &[JobState::Retryable],
    )
    .await;
    assert_eq!(job.max_attempts, 8);
    let finished = job.attempts.last().unwrap().finished_at;
    let wait = (job.run_at - finished).num_milliseconds();
    assert!((4400..=5600).contains(&wait), "waits {wait} ms");
    run.stop().await;
}

async fn retry_after_permanent_4xx_timeouts_and_dropped_connections(store: Arc<dyn Store>) {
    let rx = Receiver::start().await;
    let closing = closing_server().await;
    let mut config = test_config();
    config.permanent_4xx_after = 2;
    let run = Running::start(&store, config);
    let hooks = &run.webhooks;
    let send = |t: &str| SendEvent {
        event_type: t.into(),
        payload: json!({}),
        idempotency_key: None,
    };

    let mut limited = endpoint(rx.url("/limited"));
    limited.event_types = vec!["limited".into()];
    limited.retry_schedule_ms = Some(vec![0, 10, 10]);
    hooks.create_endpoint(limited).await.unwrap();
    rx.script("/limited", [Answer::RetryAfter(429, 1)]);
    let sent = hooks.send_event(send("limited")).await.unwrap();
    job_in(
        &store,
        &sent.event.deliveries[0].job_id,
        &[JobState::Completed],
    )
    .await;
    let got = rx.received("/limited");
    let gap = got[1].at - got[0].at;
    assert!(
        gap >= Duration::from_millis(950),
        "Retry-After honoured, not 10 ms: {gap:?}"
    );

    let mut gone = endpoint(rx.url("/gone"));
    gone.event_types = vec!["gone".into()];
    gone.retry_schedule_ms = Some(vec![0, 10, 10, 10, 10]);
    hooks.create_endpoint(gone).await.unwrap();
    rx.default_answer("/gone", Answer::Status(404));
    let sent = hooks.send_event(send("gone")).await.unwrap();
    let job = job_in(&store, &sent.event.deliveries[0].job_id, &[JobState::Dead]).await;
    assert_eq!(job.attempt, 2, "a 404 is final at permanent_4xx_after");
    assert_eq!(rx.received("/gone").len(), 2);

    let mut conflict = endpoint(rx.url("/conflict"));
    conflict.event_types = vec!["conflict".into()];
    conflict.retry_schedule_ms = Some(vec![0, 10, 10, 10]);
    hooks.create_endpoint(conflict).await.unwrap();
    rx.script(
        "/conflict",
        [
            Answer::Status(409),
            Answer::Status(409),
            Answer::Status(409),
        ],
    );
    let sent = hooks.send_event(send("conflict")).await.unwrap();
    let job = job_in(
        &store,
        &sent.event.deliveries[0].job_id,
        &[JobState::Completed],
    )
    .await;
    assert_eq!(job.attempt, 4, "409 is retried past permanent_4xx_after");

    let mut slow = endpoint(rx.url("/slow"));
    slow.event_types = vec!["slow".into()];
    slow.timeout_ms = Some(200);
    slow.retry_schedule_ms = Some(vec![0, 10]);
    hooks.create_endpoint(slow).await.unwrap();
    rx.script("/slow", [Answer::Slow(Duration::from_secs(2))]);
    let sent = hooks.send_event(send("slow")).await.unwrap();
    let job = job_in(
        &store,
        &sent.event.deliveries[0].job_id,
        &[JobState::Completed],
    )
    .await;
    assert_eq!(job.attempt, 2);
    let log = hooks.attempts_for_event(&sent.event.id).await.unwrap();
    let timed_out = log.iter().find(|a| a.attempt == 1).unwrap();
    assert!(
        timed_out.status.is_none() && timed_out.error.is_some(),
        "{timed_out:?}"
    );
    assert!(timed_out.latency_ms < 1500, "{timed_out:?}");

    let mut dropped = endpoint(format!("http://{closing}/x"));
    dropped.event_types = vec!["dropped".into()];
    dropped.retry_schedule_ms = Some(vec![0, 10]);
    hooks.create_endpoint(dropped).await.unwrap();
    let sent = hooks.send_event(send("dropped")).await.unwrap();
    let job = job_in(&store, &sent.event.deliveries[0].job_id, &[JobState::Dead]).await;
    assert_eq!(
        job.attempt, 2,
        "a dropped connection is retried until attempts run out"
    );
    run.stop().await;
}

async fn circuit_opens_then_a_probe_closes_it(store: Arc<dyn Store>) {
    let rx = Receiver::start().await;
    let mut config = test_config();
    config.circuit_threshold = 2;
    config.circuit_cooldown = Duration::from_millis(1500);
    let run = Running::start(&store, config);
    let hooks = &run.webhooks;
    let mut new = endpoint(rx.url("/c"));
    new.retry_schedule_ms = Some(vec![0, 10, 10, 10]);
    let ep = hooks.create_endpoint(new).await.unwrap();
    rx.script("/c", [Answer::Status(500), Answer::Status(500)]);
    let sent = hooks
        .send_event(SendEvent {
            event_type: "x".into(),
            payload: json!({}),
            idempotency_key: None,
        })
        .await
        .unwrap();
    let job_id = sent.event.deliveries[0].job_id.clone();
    arrivals(&rx, "/c", 2).await;
    let open = eventually(10, "circuit open", || async {
        let h = hooks.health(&ep.id).await.unwrap();
        (h.circuit == CircuitState::Open).then_some(h)
    })
    .await;
    assert_eq!(open.consecutive_failures, 2);
    let job = job_in(&store, &job_id, &[JobState::Completed]).await;
    let got = rx.received("/c");
    assert_eq!(got.len(), 3, "nothing was sent while open; one probe after");
    let pause = got[2].at - got[1].at;
    assert!(
        pause >= Duration::from_millis(1400),
        "cool-down respected: {pause:?}"
    );
    assert_eq!(job.attempt, 3, "snoozes while open used no attempt");
    let closed = hooks.health(&ep.id).await.unwrap();
    assert_eq!(closed.circuit, CircuitState::Closed);
    assert_eq!(closed.consecutive_failures, 0);
    assert_eq!(closed.last_hour.attempts, 3);
    assert_eq!(closed.last_hour.successes, 1);
    run.stop().await;
}

async fn rate_limit_holds_across_two_workers(store: Arc<dyn Store>, second: Arc<dyn Store>) {
    let rx = Receiver::start().await;
    let one = Running::start(&store, test_config());
    let two = Running::start(&second, test_config());
    let mut new = endpoint(rx.url("/rl"));
    new.rate_limit = Some(10.0);
    let ep = one.webhooks.create_endpoint(new).await.unwrap();
    let n = 35;
    let mut jobs = Vec::new();
    for i in 0..n {
        let sent = one
            .webhooks
            .send_event(SendEvent {
                event_type: "tick".into(),
                payload: json!({"i": i}),
                idempotency_key: None,
            })
            .await
            .unwrap();
        jobs.push(sent.event.deliveries[0].job_id.clone());
    }
    let got = arrivals(&rx, "/rl", n).await;
    let t0 = got[0].at;
    // Burst 10, then 10 per second: the i-th arrival is no earlier than (i + 1 - 10) / 10 s.
    for (i, r) in got.iter().enumerate() {
        let earliest = (i as f64 + 1.0 - 10.0).max(0.0) / 10.0;
        let at = (r.at - t0).as_secs_f64();
        assert!(
            at >= earliest - 0.05,
            "arrival {i} at {at:.3}s, limit allows {earliest:.3}s"
        );
    }
    let mut workers = std::collections::HashSet::new();
    for id in &jobs {
        let job = job_in(&store, id, &[JobState::Completed]).await;
        let done = job
            .attempts
            .iter()
            .rev()
            .find(|a| a.error.is_none())
            .unwrap();
        workers.insert(done.worker.clone());
    }
    assert_eq!(workers.len(), 2, "both workers delivered");
    let _ = ep;
    one.stop().await;
    two.stop().await;
}

async fn ssrf_guard_blocks_private_targets(store: Arc<dyn Store>) {
    let rx = Receiver::start().await;
    let port = rx.addr.port();
    let mut config = test_config();
    config.allow_cidrs.clear();
    config.timeout = Duration::from_secs(3);
    let strict = Running::start(&store, config);
    let hooks = &strict.webhooks;
    for (i, url) in [
        format!("http://127.0.0.1:{port}/blocked"),
        "http://10.0.0.1/".to_string(),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        format!("http://localhost:{port}/blocked"),
        format!("http://[::ffff:127.0.0.1]:{port}/blocked"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut new = endpoint(url.clone());
        new.event_types = vec![format!("t{i}")];
        hooks.create_endpoint(new).await.unwrap();
        let sent = hooks
            .send_event(SendEvent {
                event_type: format!("t{i}"),
                payload: json!({}),
                idempotency_key: None,
            })
            .await
            .unwrap();
        let job = job_in(&store, &sent.event.deliveries[0].job_id, &[JobState::Dead]).await;
        assert_eq!(job.attempt, 1, "{url}: refused at once, not retried");
        let error = job.last_error().unwrap_or_default().to_string();
        assert!(error.contains("SSRF guard"), "{url}: {error}");
        let log = hooks.attempts_for_event(&sent.event.id).await.unwrap();
        assert_eq!(log[0].result, "failed");
    }
    assert!(rx.all().is_empty(), "nothing reached the receiver");
    strict.stop().await;

    // Allow-listed loopback goes through; a redirect from it to a private or metadata
    // address is refused on the hop.
    let mut config = test_config();
    config.follow_redirects = true;
    let allowed = Running::start(&store, config);
    let hooks = &allowed.webhooks;
    let mut ok = endpoint(format!("http://localhost:{port}/ok"));
    ok.event_types = vec!["ok".into()];
    hooks.create_endpoint(ok).await.unwrap();
    let mut hop = endpoint(rx.url("/hop"));
    hop.event_types = vec!["hop".into()];
    hooks.create_endpoint(hop).await.unwrap();
    rx.default_answer("/hop", Answer::Redirect("http://10.0.0.1/internal".into()));
    let mut hop_meta = endpoint(rx.url("/hop-meta"));
    hop_meta.event_types = vec!["hop-meta".into()];
    hooks.create_endpoint(hop_meta).await.unwrap();
    rx.default_answer(
        "/hop-meta",
        Answer::Redirect("http://169.254.169.254/latest/meta-data/".into()),
    );
    let mut hop_ok = endpoint(rx.url("/hop-ok"));
    hop_ok.event_types = vec!["hop-ok".into()];
    hooks.create_endpoint(hop_ok).await.unwrap();
    rx.default_answer("/hop-ok", Answer::Redirect(rx.url("/landed")));
    for (t, state) in [
        ("ok", JobState::Completed),
        ("hop", JobState::Dead),
        ("hop-meta", JobState::Dead),
        ("hop-ok", JobState::Completed),
    ] {
        let sent = hooks
            .send_event(SendEvent {
                event_type: t.into(),
                payload: json!({}),
                idempotency_key: None,
            })
            .await
            .unwrap();
        let job = job_in(
            &store,
            &sent.event.deliveries[0].job_id,
            &[JobState::Completed, JobState::Dead],
        )
        .await;
        assert_eq!(job.state, state, "{t}: {:?}", job.last_error());
        if state == JobState::Dead {
            assert!(
                job.last_error().unwrap().contains("SSRF guard"),
                "{t}: {:?}",
                job.last_error()
            );
            assert_eq!(job.attempt, 1);
        }
    }
    assert_eq!(rx.received("/ok").len(), 1);
    assert_eq!(rx.received("/landed").len(), 1);
    allowed.stop().await;
}

async fn auto_disable_after_the_period_then_replay(store: Arc<dyn Store>) {
    let rx = Receiver::start().await;
    let mut config = test_config();
    config.auto_disable_after = Duration::from_millis(800);
    config.circuit_threshold = 1000;
    let run = Running::start(&store, config);
    let hooks = &run.webhooks;
    let mut failing = endpoint(rx.url("/failing"));
    failing.event_types = vec!["work".into()];
    failing.retry_schedule_ms = Some(vec![0, 300, 300, 300, 300, 300, 300, 300, 300]);
    let failing = hooks.create_endpoint(failing).await.unwrap();
    let mut watcher = endpoint(rx.url("/watcher"));
    watcher.event_types = vec![EVENT_ENDPOINT_DISABLED.into()];
    hooks.create_endpoint(watcher).await.unwrap();
    rx.default_answer("/failing", Answer::Status(500));
    let sent = hooks
        .send_event(SendEvent {
            event_type: "work".into(),
            payload: json!({}),
            idempotency_key: None,
        })
        .await
        .unwrap();
    let job_id = sent.event.deliveries[0].job_id.clone();
    let job = job_in(&store, &job_id, &[JobState::Cancelled]).await;
    assert!(job.attempt >= 3 && job.attempt < 9, "{}", job.attempt);
    let ep = hooks.endpoint(&failing.id).await.unwrap();
    assert!(!ep.enabled);
    assert!(ep.disabled_reason.unwrap().contains("failing since"));
    let audit = store.meta_list(AUDIT, &MetaQuery::default()).await.unwrap();
    let entry = audit
        .iter()
        .find(|r| r.value["action"] == "webhook.endpoint.auto_disabled")
        .expect("an audit record");
    // The API's audit shape, so `GET /v1/audit` lists it.
    assert_eq!(entry.value["actor"]["name"], "system");
    assert_eq!(entry.value["target"]["webhook_endpoint"], failing.id);
    assert_eq!(entry.value["affected"], 1);
    let notice = arrivals(&rx, "/watcher", 1).await;
    let body: serde_json::Value = serde_json::from_slice(&notice[0].body).unwrap();
    assert_eq!(body["type"], EVENT_ENDPOINT_DISABLED);
    assert_eq!(body["data"]["endpoint_id"], failing.id);

    // Re-enabling sends nothing by itself; replay does, with the same webhook-id.
    rx.default_answer("/failing", Answer::Status(200));
    let before = rx.received("/failing").len();
    hooks.set_enabled(&failing.id, true).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received("/failing").len(), before);
    let replayed = hooks
        .replay_failed(&failing.id, Utc::now() - chrono::Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(replayed.queued, 1);
    job_in(&store, &job_id, &[JobState::Completed]).await;
    let last = rx.received("/failing").pop().unwrap();
    assert_eq!(last.header("webhook-id"), Some(sent.event.id.as_str()));

    // Replaying the event and the single delivery send it again.
    let again = hooks.replay_event(&sent.event.id).await.unwrap();
    assert_eq!(again.queued, 1);
    job_in(&store, &job_id, &[JobState::Completed]).await;
    arrivals(&rx, "/failing", before + 2).await;
    eventually(10, "delivery finished", || async {
        let j = store.get(job_id.parse().unwrap()).await.unwrap()?;
        j.state.is_terminal().then_some(())
    })
    .await;
    hooks.replay_delivery(&job_id).await.unwrap();
    arrivals(&rx, "/failing", before + 3).await;
    run.stop().await;
}

/// Rotating with overlap 0 ends every older secret, not only the one just rotated out: after
/// two rotations with an overlap and one without, only the newest secret signs.
async fn rotation_without_overlap_ends_every_older_secret(store: Arc<dyn Store>) {
    let rx = Receiver::start().await;
    let run = Running::start(&store, test_config());
    let hooks = &run.webhooks;
    let ep = hooks.create_endpoint(endpoint(rx.url("/r"))).await.unwrap();
    let first = ep.secrets[0].secret.clone();
    let hour = Some(Duration::from_secs(3600));
    let second = hooks.rotate_secret(&ep.id, None, hour).await.unwrap();
    let third = hooks.rotate_secret(&ep.id, None, hour).await.unwrap();
    assert_eq!(third.live_secrets(Utc::now()).count(), 3, "{third:?}");
    let second = second.secrets[0].secret.clone();
    let third = third.secrets[0].secret.clone();

    let last = hooks
        .rotate_secret(&ep.id, None, Some(Duration::ZERO))
        .await
        .unwrap();
    let newest = last.secrets[0].secret.clone();
    let stored = hooks.endpoint(&ep.id).await.unwrap();
    let live: Vec<&str> = stored.live_secrets(Utc::now()).collect();
    assert_eq!(live.len(), 1, "only the newest secret is live: {stored:?}");

    let sent = hooks
        .send_event(SendEvent {
            event_type: "invoice.paid".into(),
            payload: json!({}),
            idempotency_key: None,
        })
        .await
        .unwrap();
    job_in(
        &store,
        &sent.event.deliveries[0].job_id,
        &[JobState::Completed],
    )
    .await;
    let r = &arrivals(&rx, "/r", 1).await[0];
    assert!(signed_by(&newest, r), "the newest secret signs");
    for old in [&first, &second, &third] {
        assert!(!signed_by(old, r), "an older secret still signs: {old}");
    }
    run.stop().await;
}

backend_tests!(
    rotation_without_overlap_ends_every_older_secret,
    signed_fan_out_with_idempotent_events,
    retries_keep_the_id_and_follow_the_schedule,
    retry_after_permanent_4xx_timeouts_and_dropped_connections,
    circuit_opens_then_a_probe_closes_it,
    ssrf_guard_blocks_private_targets,
    auto_disable_after_the_period_then_replay,
);

/// Two workers with their own connections to one store (as two processes would have).
mod two_connections {
    use super::*;
    use conveyor_worker::store::{self, StoreOptions};

    async fn run(t: conveyor_tests::TestStore) {
        let second = store::connect(&t.url, StoreOptions::default())
            .await
            .unwrap();
        rate_limit_holds_across_two_workers(t.store.clone(), second).await;
        t.cleanup().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        run(conveyor_tests::TestStore::sqlite().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let Some(t) = conveyor_tests::TestStore::postgres().await else {
            return;
        };
        run(t).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis() {
        let Some(t) = conveyor_tests::TestStore::redis().await else {
            return;
        };
        run(t).await;
    }
}

/// What an endpoint keeps is bounded: each delivery sends its headers and the attempt log
/// keeps them, so a URL, description, filter or header set without limit is refused up
/// front, naming the field, as is a header value that could never be sent.
#[tokio::test]
async fn endpoint_sizes_are_bounded_and_header_values_must_be_sendable() {
    use conveyor_jobs::webhook::WebhookError;
    let t = conveyor_tests::TestStore::sqlite().await;
    let hooks = Webhooks::new(t.store.clone(), test_config())
        .unwrap()
        .with_keyring(conveyor_tests::test_keyring());
    let base = || endpoint("https://hooks.example.com/in".into());
    let refused = |e: WebhookError, field: &str, text: &str| match e {
        WebhookError::Invalid { field: f, message } => {
            assert_eq!(f, field, "{message}");
            assert!(message.contains(text), "{field}: {message}");
        }
        other => panic!("{field}: expected a validation error, got {other}"),
    };

    let mut ep = base();
    ep.url = format!("https://hooks.example.com/{}", "a".repeat(3_000));
    refused(
        hooks.create_endpoint(ep).await.unwrap_err(),
        "url",
        "at most 2048",
    );
    let mut ep = base();
    ep.description = "d".repeat(5_000);
    refused(
        hooks.create_endpoint(ep).await.unwrap_err(),
        "description",
        "at most 1024",
    );
    let mut ep = base();
    ep.event_types = (0..300).map(|i| format!("type.{i}")).collect();
    refused(
        hooks.create_endpoint(ep).await.unwrap_err(),
        "event_types",
        "at most 256",
    );
    let mut ep = base();
    ep.headers = (0..40).map(|i| (format!("x-h{i}"), "v".into())).collect();
    refused(
        hooks.create_endpoint(ep).await.unwrap_err(),
        "headers",
        "at most 32",
    );
    let mut ep = base();
    ep.headers.insert("x-big".into(), "v".repeat(100_000));
    refused(
        hooks.create_endpoint(ep).await.unwrap_err(),
        "headers",
        "at most 4096",
    );
    let mut ep = base();
    ep.headers = (0..8)
        .map(|i| (format!("x-h{i}"), "v".repeat(4_000)))
        .collect();
    refused(
        hooks.create_endpoint(ep).await.unwrap_err(),
        "headers",
        "at most 16384",
    );
    let mut ep = base();
    ep.headers
        .insert("x-split".into(), "a\r\nx-injected: 1".into());
    refused(
        hooks.create_endpoint(ep).await.unwrap_err(),
        "headers",
        "not a valid header value",
    );
    let mut ep = base();
    ep.headers.insert("x-latin".into(), "caf\u{e9}".into());
    refused(
        hooks.create_endpoint(ep).await.unwrap_err(),
        "headers",
        "not a valid header value",
    );

    // The same limits hold for an update.
    let ok = hooks.create_endpoint(base()).await.unwrap();
    let patch = EndpointPatch {
        headers: Some([("x-big".to_string(), "v".repeat(100_000))].into()),
        ..EndpointPatch::default()
    };
    refused(
        hooks.update_endpoint(&ok.id, patch).await.unwrap_err(),
        "headers",
        "at most 4096",
    );
    t.cleanup().await;
}
