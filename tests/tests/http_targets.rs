//! `http.request` end to end against a real HTTP receiver (an axum server on 127.0.0.1:0), on
//! SQLite and Postgres (the store is where the shared rate limit and the attempt log live):
//! a 2xx completes with a signature checked by an independent HMAC and Conveyor's headers;
//! `Retry-After` is honoured; 429 retries; 404 is dead at once; a redirect is not followed;
//! a timeout retries; the SSRF guard refuses raw URLs to private addresses; a job that escapes
//! its target is refused at enqueue by the kind's check, and at run time if it got into the
//! store another way; the shared rate limit spaces a target's requests; the Python and Node
//! verification snippets of docs/http-targets.md accept a real request and refuse it altered.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use conveyor_jobs::http_target::{
    self, HttpConfig, HttpRequestsConfig, HttpTarget, HttpTargets, SecretText,
};
use conveyor_tests::receiver::{Answer, Received, Receiver};
use conveyor_tests::{TestStore, eventually};
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::{Job, JobId, JobState, NewJob, Registry, Store};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

/// The secret of target `app` (from the Standard Webhooks specification's example).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Target `app` at the receiver's `/tasks/` (loopback allowed for it alone), signed, with a
/// credential header and a 1 s timeout; target `slow` limited to 2 requests a second.
fn config(rx: &Receiver) -> HttpConfig {
    let mut app = HttpTarget::new(rx.url("/tasks/"));
    app.signing_secret = Some(SecretText(SECRET.into()));
    app.headers
        .insert("Authorization".into(), "Bearer app-token".into());
    app.timeout = Some(Duration::from_secs(1));
    app.allow_cidrs = vec!["127.0.0.0/8".parse().unwrap()];
    let mut slow = HttpTarget::new(rx.url("/limited"));
    slow.rate_limit = Some(2.0);
    slow.allow_cidrs = vec!["127.0.0.0/8".parse().unwrap()];
    HttpConfig {
        requests: HttpRequestsConfig {
            // Raw URLs are allowed here so the guard (not the switch) is what refuses them.
            allow_raw_urls: true,
            ..HttpRequestsConfig::default()
        },
        targets: BTreeMap::from([("app".to_string(), app), ("slow".to_string(), slow)]),
    }
}

struct Running {
    targets: Arc<HttpTargets>,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<conveyor_worker::Result<()>>,
}

impl Running {
    fn start(store: &Arc<dyn Store>, config: HttpConfig) -> Running {
        let targets = Arc::new(
            HttpTargets::new(store.clone(), config, &conveyor_tests::test_keyring()).unwrap(),
        );
        let mut registry = Registry::new();
        http_target::register(&mut registry, targets.clone());
        let worker = Worker::new(
            store.clone(),
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
        Running {
            targets,
            shutdown,
            handle,
        }
    }

    /// Enqueues as a client would: the kind's enqueue check first, then the insert.
    async fn enqueue(&self, store: &Arc<dyn Store>, args: Value) -> JobId {
        self.targets
            .validators()
            .check(http_target::KIND, &args)
            .unwrap_or_else(|e| panic!("{args} refused: {e}"));
        store
            .enqueue(NewJob::new(http_target::KIND, args))
            .await
            .unwrap()
            .id
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

async fn job_in(store: &Arc<dyn Store>, id: JobId, states: &[JobState]) -> Job {
    eventually(30, &format!("job {id} to reach {states:?}"), || {
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

/// Standard Webhooks verification written here with hmac/sha2, not with the signing code.
fn signed_by(secret: &str, r: &Received) -> bool {
    let key = B64.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    let id = r.header("webhook-id").unwrap();
    let ts = r.header("webhook-timestamp").unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&r.body);
    let want = format!("v1,{}", B64.encode(mac.finalize().into_bytes()));
    r.header("webhook-signature")
        .unwrap_or_default()
        .split(' ')
        .any(|s| s == want)
}

macro_rules! sqlite_and_postgres {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let t = conveyor_tests::TestStore::sqlite().await;
                    super::$name(t.store.clone()).await;
                    t.cleanup().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(t) = conveyor_tests::TestStore::postgres().await else { return };
                    super::$name(t.store.clone()).await;
                    t.cleanup().await;
                }
            )*
        }
    };
}

sqlite_and_postgres!(
    two_xx_completes_signed_with_the_job_headers,
    retry_after_429_404_and_timeouts,
    the_ssrf_guard_refuses_raw_private_urls,
    a_job_outside_its_target_is_refused_at_enqueue_and_at_run_time,
    the_rate_limit_spaces_a_targets_requests,
);

async fn two_xx_completes_signed_with_the_job_headers(store: Arc<dyn Store>) {
    let rx = Receiver::start().await;
    let running = Running::start(&store, config(&rx));
    let id = running
        .enqueue(
            &store,
            json!({
                "target": "app",
                "url": "invoices/42/send?full=1",
                "headers": {"X-Tenant": "acme", "Authorization": "Bearer from-the-job"},
                "body": {"invoice": 42},
            }),
        )
        .await;
    let job = job_in(&store, id, &[JobState::Completed]).await;
    assert_eq!(job.attempt, 1);
    let got = arrivals(&rx, "/tasks/invoices/42/send", 1).await;
    let r = &got[0];
    assert!(
        signed_by(SECRET, r),
        "the signature verifies: {:?}",
        r.headers
    );
    assert!(!signed_by("whsec_c29tZSBvdGhlciBzZWNyZXQ=", r));
    assert_eq!(r.header("webhook-id"), Some(id.to_string().as_str()));
    assert_eq!(r.header("conveyor-job-id"), Some(id.to_string().as_str()));
    assert_eq!(r.header("conveyor-attempt"), Some("1"));
    assert_eq!(r.header("conveyor-kind"), Some("http.request"));
    assert_eq!(r.header("conveyor-target"), Some("app"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-tenant"), Some("acme"));
    assert_eq!(
        r.header("authorization"),
        Some("Bearer app-token"),
        "the target's credentials win over the job's"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&r.body).unwrap(),
        json!({"invoice": 42})
    );

    let log = running.targets.attempts(&id.to_string()).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].status, Some(200));
    assert_eq!(log[0].result, "done");
    assert_eq!(log[0].method, "POST");
    assert_eq!(log[0].target.as_deref(), Some("app"));
    assert!(log[0].url.ends_with("/tasks/invoices/42/send?full=1"));
    assert_eq!(log[0].response_body, "answer 200");
    assert_eq!(log[0].request_headers["authorization"], "***");
    assert!(log[0].request_headers["webhook-signature"].starts_with("v1,"));

    // A string body is sent as text, with the method asked for; no body, nothing at all.
    let id = running
        .enqueue(
            &store,
            json!({"target": "app", "url": "/notes", "method": "PUT", "body": "hello"}),
        )
        .await;
    job_in(&store, id, &[JobState::Completed]).await;
    let r = &arrivals(&rx, "/tasks/notes", 1).await[0];
    assert_eq!(&r.body[..], b"hello");
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert!(signed_by(SECRET, r));
    let log = running.targets.attempts(&id.to_string()).await.unwrap();
    assert_eq!(log[0].method, "PUT");
    running.stop().await;
}

async fn retry_after_429_404_and_timeouts(store: Arc<dyn Store>) {
    let rx = Receiver::start().await;
    let running = Running::start(&store, config(&rx));
    rx.script("/tasks/busy", [Answer::RetryAfter(503, 2)]);
    rx.script("/tasks/throttled", [Answer::Status(429)]);
    rx.default_answer("/tasks/gone", Answer::Status(404));
    rx.script("/tasks/slow", [Answer::Slow(Duration::from_secs(3))]);
    rx.script(
        "/tasks/moved",
        [Answer::Redirect(rx.url("/tasks/elsewhere"))],
    );
    let busy = running
        .enqueue(&store, json!({"target": "app", "url": "busy"}))
        .await;
    let throttled = running
        .enqueue(&store, json!({"target": "app", "url": "throttled"}))
        .await;
    let gone = running
        .enqueue(&store, json!({"target": "app", "url": "gone"}))
        .await;
    let slow = running
        .enqueue(&store, json!({"target": "app", "url": "slow"}))
        .await;
    let moved = running
        .enqueue(&store, json!({"target": "app", "url": "moved"}))
        .await;

    // 503 with Retry-After: 2 waits about two seconds, then completes.
    let job = job_in(&store, busy, &[JobState::Completed]).await;
    assert_eq!(job.attempt, 2);
    let got = arrivals(&rx, "/tasks/busy", 2).await;
    let gap = got[1].at - got[0].at;
    assert!(
        gap >= Duration::from_millis(1800) && gap < Duration::from_secs(6),
        "Retry-After: 2 gave a gap of {gap:?}"
    );
    assert_eq!(got[1].header("conveyor-attempt"), Some("2"));
    assert_eq!(
        got[0].header("webhook-id"),
        got[1].header("webhook-id"),
        "the id is stable across attempts"
    );
    let log = running.targets.attempts(&busy.to_string()).await.unwrap();
    assert_eq!(
        log.iter()
            .map(|a| (a.status, a.result.as_str()))
            .collect::<Vec<_>>(),
        vec![(Some(503), "retry"), (Some(200), "done")]
    );

    // 429 without Retry-After retries after the kind's backoff.
    let job = job_in(&store, throttled, &[JobState::Completed]).await;
    assert_eq!(job.attempt, 2);
    assert!(
        job.attempts[0]
            .error
            .as_deref()
            .unwrap()
            .contains("HTTP 429")
    );

    // 404 is final: dead after one attempt, the answer quoted in the error.
    let job = job_in(&store, gone, &[JobState::Dead]).await;
    assert_eq!(job.attempt, 1);
    let error = job.last_error().unwrap();
    assert!(
        error.contains("HTTP 404") && error.contains("answer 404"),
        "{error}"
    );
    assert_eq!(rx.received("/tasks/gone").len(), 1);
    let log = running.targets.attempts(&gone.to_string()).await.unwrap();
    assert_eq!(log[0].result, "failed");

    // A redirect is not followed, and (3xx not being retried) it is final.
    let job = job_in(&store, moved, &[JobState::Dead]).await;
    assert!(job.last_error().unwrap().contains("HTTP 307"));
    assert!(rx.received("/tasks/elsewhere").is_empty(), "not followed");

    // No answer within the target's 1 s timeout: retried, then done.
    let job = job_in(&store, slow, &[JobState::Completed]).await;
    assert_eq!(job.attempt, 2);
    let first = job.attempts[0].error.as_deref().unwrap();
    assert!(first.contains("no answer within 1s"), "{first}");
    let log = running.targets.attempts(&slow.to_string()).await.unwrap();
    assert_eq!(log[0].status, None);
    assert_eq!(log[0].result, "retry");
    running.stop().await;
}

async fn the_ssrf_guard_refuses_raw_private_urls(store: Arc<dyn Store>) {
    let rx = Receiver::start().await;
    let running = Running::start(&store, config(&rx));
    let port = rx.addr.port();
    // A name that resolves to loopback passes the enqueue check and is refused on connect.
    let id = running
        .enqueue(
            &store,
            json!({"url": format!("http://localhost:{port}/raw"), "body": {}}),
        )
        .await;
    let job = job_in(&store, id, &[JobState::Dead]).await;
    assert_eq!(job.attempt, 1, "refused at once, not retried");
    let error = job.last_error().unwrap();
    assert!(error.contains("SSRF guard"), "{error}");
    // Literal private addresses are refused at enqueue already.
    for url in [
        format!("http://127.0.0.1:{port}/raw"),
        "http://10.0.0.1/".to_string(),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        format!("http://[::ffff:127.0.0.1]:{port}/raw"),
    ] {
        let err = running
            .targets
            .validators()
            .check(http_target::KIND, &json!({ "url": url }))
            .unwrap_err();
        match err {
            conveyor_worker::Error::InvalidInput { field, message } => {
                assert_eq!(field, "args.url", "{url}");
                assert!(message.contains("SSRF guard"), "{url}: {message}");
            }
            other => panic!("{url}: {other}"),
        }
    }
    assert!(rx.all().is_empty(), "nothing reached the receiver");
    running.stop().await;
}

async fn a_job_outside_its_target_is_refused_at_enqueue_and_at_run_time(store: Arc<dyn Store>) {
    let rx = Receiver::start().await;
    let mut strict = config(&rx);
    strict.requests.allow_raw_urls = false;
    let running = Running::start(&store, strict);
    let checks = running.targets.validators();
    let port = rx.addr.port();
    for (args, field, words) in [
        (
            json!({"target": "app", "url": "https://evil.example/tasks/x"}),
            "args.url",
            "outside the target's base URL",
        ),
        (
            json!({"target": "app", "url": "../admin"}),
            "args.url",
            "outside",
        ),
        (
            json!({"target": "app", "url": format!("http://127.0.0.1:{port}/admin")}),
            "args.url",
            "may only reach URLs under",
        ),
        (
            json!({"target": "nope", "url": "x"}),
            "args.target",
            "configured: app, slow",
        ),
        (
            json!({"url": "https://example.com/"}),
            "args.target",
            "allow_raw_urls",
        ),
        (json!({}), "args.target", "give the `target`"),
        (
            json!({"target": "app", "method": "BREW"}),
            "args.method",
            "not one of",
        ),
        (
            json!({"target": "app", "headers": {"webhook-id": "forged"}}),
            "args.headers.webhook-id",
            "set by Conveyor",
        ),
        (json!({"target": "app", "ur": "x"}), "args", "unknown field"),
    ] {
        match checks.check(http_target::KIND, &args).unwrap_err() {
            conveyor_worker::Error::InvalidInput { field: f, message } => {
                assert_eq!(f, field, "{args}: {message}");
                assert!(message.contains(words), "{args}: {message}");
            }
            other => panic!("{args}: {other}"),
        }
    }

    // A job written into the store directly (no enqueue check) is still held to its target.
    let id = store
        .enqueue(NewJob::new(
            http_target::KIND,
            json!({"target": "app", "url": rx.url("/admin")}),
        ))
        .await
        .unwrap()
        .id;
    let job = job_in(&store, id, &[JobState::Dead]).await;
    assert_eq!(job.attempt, 1);
    assert!(job.last_error().unwrap().contains("outside"));
    assert!(rx.all().is_empty(), "nothing reached the receiver");
    running.stop().await;
}

async fn the_rate_limit_spaces_a_targets_requests(store: Arc<dyn Store>) {
    let rx = Receiver::start().await;
    let running = Running::start(&store, config(&rx));
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(running.enqueue(&store, json!({"target": "slow"})).await);
    }
    for id in ids {
        let job = job_in(&store, id, &[JobState::Completed]).await;
        assert_eq!(job.attempt, 1, "waiting for a token uses no attempt");
    }
    let got = arrivals(&rx, "/limited", 6).await;
    // 2 per second with a burst of 2: six requests take at least two seconds.
    let span = got[5].at - got[0].at;
    assert!(
        span >= Duration::from_millis(1500),
        "six requests in {span:?}"
    );
    running.stop().await;
}

/// The code block of `lang` in docs/http-targets.md.
fn doc_snippet(lang: &str) -> String {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/http-targets.md"
    ))
    .unwrap();
    let start = doc
        .find(&format!("```{lang}\n"))
        .unwrap_or_else(|| panic!("docs/http-targets.md has a {lang} block"))
        + lang.len()
        + 4;
    let end = start + doc[start..].find("```").unwrap();
    doc[start..end].to_string()
}

/// Runs `program` on `script` with the request's headers and body as files; its stdout.
fn run_snippet(program: &str, script: &str, dir: &std::path::Path) -> Option<String> {
    let path = dir.join(format!("verify-{program}"));
    std::fs::write(&path, script).unwrap();
    match std::process::Command::new(program).arg(&path).output() {
        Ok(out) => {
            assert!(
                out.status.success(),
                "{program}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipping the {program} snippet: {program} cannot run ({e})");
            None
        }
        Err(e) => panic!("{program} is needed under CI=true: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_python_and_node_checks_verify_a_real_request() {
    let t = TestStore::sqlite().await;
    let store = t.store.clone();
    let rx = Receiver::start().await;
    let running = Running::start(&store, config(&rx));
    let id = running
        .enqueue(
            &store,
            json!({"target": "app", "url": "doc", "body": {"invoice": 42, "note": "é"}}),
        )
        .await;
    job_in(&store, id, &[JobState::Completed]).await;
    let r = arrivals(&rx, "/tasks/doc", 1).await.remove(0);
    running.stop().await;

    let dir = std::env::temp_dir().join(format!("conveyor-doc-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let headers = serde_json::to_string(&r.headers).unwrap();
    std::fs::write(dir.join("headers.json"), &headers).unwrap();
    std::fs::write(dir.join("body"), &r.body).unwrap();
    let mut altered = r.body.to_vec();
    altered[1] ^= 1;
    std::fs::write(dir.join("altered"), &altered).unwrap();
    let d = dir.display();

    let python = format!(
        "{}\nimport json\nh = json.load(open('{d}/headers.json'))\n\
         print(verify('{SECRET}', h, open('{d}/body', 'rb').read()),\n\
               verify('{SECRET}', h, open('{d}/altered', 'rb').read()))\n",
        doc_snippet("python")
    );
    if let Some(out) = run_snippet("python3", &python, &dir) {
        assert_eq!(out, "True False");
    }
    let node = format!(
        "{}\nconst fs = require('fs');\nconst h = JSON.parse(fs.readFileSync('{d}/headers.json'));\n\
         console.log(verify('{SECRET}', h, fs.readFileSync('{d}/body')), \
         verify('{SECRET}', h, fs.readFileSync('{d}/altered')));\n",
        doc_snippet("js")
    );
    if let Some(out) = run_snippet("node", &node, &dir) {
        assert_eq!(out, "true false");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    t.cleanup().await;
}
