//! One rule per operation, whichever door it comes through: the real `conveyor` binary and a
//! real API server over the same store refuse the same bad enqueue with the same message,
//! touch the same jobs in bulk, and leave the same audit records; every CLI webhook change
//! is audited; an enqueue nobody serves warns, and `conveyor queues` shows the queue.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::{Process, conveyor, run, run_json};
use conveyor_api::audit::{self, Actor, AuditEntry};
use conveyor_api::key::{self, Scope};
use conveyor_api::{ApiConfig, AppState};
use conveyor_tests::eventually;
use conveyor_tests::receiver::Receiver;
use conveyor_worker::store::{FetchRequest, Finish};
use conveyor_worker::{AttemptOutcome, AttemptRecord, JobId, JobState, NewJob, Store};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

cli_backend_tests!(
    the_same_bad_enqueue_is_refused_alike,
    bulk_actions_touch_the_same_jobs,
    every_cli_webhook_change_is_audited,
    an_unserved_enqueue_warns_and_the_queue_shows_it,
    queues_pause_and_resume_from_the_cli,
);

/// A real API server over `store` on 127.0.0.1:0, and an admin key for it.
struct Api {
    base: String,
    key: String,
    http: reqwest::Client,
    stop: CancellationToken,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Api {
    async fn start(store: Arc<dyn Store>) -> Api {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let app = conveyor_api::router(AppState::new(store.clone(), ApiConfig::default()));
        let s = stop.clone();
        tokio::spawn(async move {
            conveyor_api::serve(listener, app, async move { s.cancelled().await })
                .await
                .unwrap();
        });
        let (_, key) = key::create(&store, "rules", Scope::Admin, Actor::cli())
            .await
            .unwrap();
        Api {
            base,
            key,
            http: reqwest::Client::new(),
            stop,
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

async fn audit_entries(store: &Arc<dyn Store>) -> Vec<AuditEntry> {
    audit::list(store, None, 1000).await.unwrap()
}

async fn the_same_bad_enqueue_is_refused_alike(url: String, store: Arc<dyn Store>) {
    let api = Api::start(store.clone()).await;
    let far = (Utc::now() + chrono::Duration::days(3650)).to_rfc3339();
    let past = (Utc::now() - chrono::Duration::days(3)).to_rfc3339();
    let cases: [(&str, Value, Vec<&str>); 4] = [
        (
            "max_attempts",
            json!({"kind": "demo.echo", "max_attempts": 0}),
            vec!["--max-attempts", "0"],
        ),
        (
            "max_attempts",
            json!({"kind": "demo.echo", "max_attempts": 100_000}),
            vec!["--max-attempts", "100000"],
        ),
        (
            "run_at",
            json!({"kind": "demo.echo", "run_at": far}),
            vec!["--run-at", &far],
        ),
        (
            "run_at",
            json!({"kind": "demo.echo", "run_at": past}),
            vec!["--run-at", &past],
        ),
    ];
    for (field, body, flags) in cases {
        let (status, problem) = api.post("/v1/jobs", body.clone()).await;
        assert_eq!(status, 422, "{body}: {problem}");
        assert_eq!(problem["errors"][0]["field"], field, "{problem}");
        let message = problem["errors"][0]["message"]
            .as_str()
            .unwrap()
            .to_string();

        let mut args = vec!["enqueue", "--kind", "demo.echo"];
        args.extend(&flags);
        let (code, _, err) = run(&url, &args);
        assert_eq!(code, 2, "{flags:?} is bad input: {err}");
        // The run_at message names the instant; both print it the same way.
        assert!(
            err.contains(&format!("invalid {field}: {message}")),
            "{flags:?}: the CLI says {err:?}, the API said {message:?}"
        );
    }
    assert!(
        store
            .list(&Default::default(), Default::default())
            .await
            .unwrap()
            .is_empty(),
        "nothing was enqueued"
    );
}

const LEASE: Duration = Duration::from_secs(30);

/// One job in every state on `queue`; returns their ids by state.
async fn one_in_every_state(s: &Arc<dyn Store>, queue: &str) -> Vec<(JobState, JobId)> {
    let mut out = Vec::new();
    let later = Utc::now() + chrono::Duration::hours(1);
    let scheduled = s
        .enqueue(
            NewJob::new("demo.echo", json!({}))
                .queue(queue)
                .run_at(later),
        )
        .await
        .unwrap();
    out.push((JobState::Scheduled, scheduled.id));
    // Fetch one at a time so each ends as planned.
    for state in [
        JobState::Running,
        JobState::Retryable,
        JobState::Completed,
        JobState::Cancelled,
        JobState::Dead,
    ] {
        s.enqueue(NewJob::new("demo.echo", json!({})).queue(queue))
            .await
            .unwrap();
        let job = s
            .fetch(FetchRequest {
                queue,
                limit: 1,
                worker: "w1",
                lease: LEASE,
            })
            .await
            .unwrap()
            .pop()
            .unwrap();
        if state != JobState::Running {
            let now = Utc::now();
            let outcome = match state {
                JobState::Completed => AttemptOutcome::Completed,
                JobState::Cancelled => AttemptOutcome::Cancelled,
                _ => AttemptOutcome::Failed,
            };
            s.finish(vec![Finish {
                id: job.id,
                attempt: job.attempt,
                state,
                run_at: (state == JobState::Retryable).then_some(later),
                attempt_delta: 0,
                record: AttemptRecord {
                    attempt: job.attempt,
                    started_at: now,
                    finished_at: now,
                    worker: Some("w1".into()),
                    outcome,
                    error: Some("failed".into()),
                    causes: Vec::new(),
                    duration_ms: 1,
                    traceback: None,
                },
                result: None,
            }])
            .await
            .unwrap();
        }
        out.push((state, job.id));
    }
    let available = s
        .enqueue(NewJob::new("demo.echo", json!({})).queue(queue))
        .await
        .unwrap();
    out.push((JobState::Available, available.id));
    out
}

/// Each job's state now (`None`: deleted), in the order given.
async fn states_now(s: &Arc<dyn Store>, jobs: &[(JobState, JobId)]) -> Vec<Option<JobState>> {
    let mut out = Vec::new();
    for (_, id) in jobs {
        out.push(s.get(*id).await.unwrap().map(|j| j.state));
    }
    out
}

/// The newest audit record, with the queue name in its target replaced by `<queue>`.
async fn last_audit(s: &Arc<dyn Store>, queue: &str) -> (String, Value, u64) {
    let e = audit_entries(s).await.remove(0);
    let target = e.target.to_string().replace(queue, "<queue>");
    (e.action, serde_json::from_str(&target).unwrap(), e.affected)
}

/// One bulk action on dead jobs through both doors, each on its own queue with one job in
/// every state: the API's `POST /v1/jobs/bulk/<action>` on `<name>-api`, and
/// `conveyor dead <name>` on `<name>-cli`. Both must match one job and write the same audit
/// record. Answers the API side's jobs, and the states after of the API's and the CLI's jobs.
async fn through_both_doors(
    api: &Api,
    url: &str,
    store: &Arc<dyn Store>,
    name: &str,
    action: &str,
) -> (
    Vec<(JobState, JobId)>,
    Vec<Option<JobState>>,
    Vec<Option<JobState>>,
) {
    let (api_queue, cli_queue) = (format!("{name}-api"), format!("{name}-cli"));
    let by_api = one_in_every_state(store, &api_queue).await;
    let by_cli = one_in_every_state(store, &cli_queue).await;
    let (status, answer) = api
        .post(
            &format!("/v1/jobs/bulk/{action}"),
            json!({"filter": {"queue": api_queue, "states": ["dead"]}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let api_audit = last_audit(store, &api_queue).await;
    let cli = run_json(url, &["dead", name, "--queue", &cli_queue]);
    let cli_audit = last_audit(store, &cli_queue).await;
    assert_eq!(
        (answer["affected"].clone(), cli["matched"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(api_audit, cli_audit, "the same audit record");
    let after = states_now(store, &by_api).await;
    let cli_after = states_now(store, &by_cli).await;
    (by_api, after, cli_after)
}

async fn bulk_actions_touch_the_same_jobs(url: String, store: Arc<dyn Store>) {
    let api = Api::start(store.clone()).await;

    // Retry a queue's dead jobs: the API's bulk retry and `conveyor dead retry`.
    let (by_api, after, by_cli_after) =
        through_both_doors(&api, &url, &store, "retry", "retry").await;
    assert_eq!(after, by_cli_after, "the same jobs moved");
    let expected: Vec<Option<JobState>> = by_api
        .iter()
        .map(|(s, _)| {
            Some(if *s == JobState::Dead {
                JobState::Available
            } else {
                *s
            })
        })
        .collect();
    assert_eq!(after, expected, "only the dead job, back to available");

    // Delete a queue's dead jobs: the API's bulk discard and `conveyor dead purge`.
    let (_, after, by_cli_after) = through_both_doors(&api, &url, &store, "purge", "discard").await;
    assert_eq!(after, by_cli_after, "the same jobs deleted");
    assert_eq!(after.iter().filter(|s| s.is_none()).count(), 1);

    // More ids than one call may name: refused alike, with the same message.
    let ids: Vec<String> = (0..1001).map(|_| JobId::new().to_string()).collect();
    let (status, problem) = api
        .post(
            "/v1/jobs/bulk/retry",
            json!({"filter": {"ids": ids, "states": ["dead"]}}),
        )
        .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "filter.ids");
    let message = problem["errors"][0]["message"].as_str().unwrap();
    let mut args = vec!["dead", "retry"];
    args.extend(ids.iter().map(String::as_str));
    let (code, _, err) = run(&url, &args);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("invalid filter.ids: {message}")),
        "the CLI says {err:?}, the API said {message:?}"
    );
}

async fn every_cli_webhook_change_is_audited(url: String, store: Arc<dyn Store>) {
    let rx = Receiver::start().await;
    let ep = run_json(
        &url,
        &[
            "webhooks",
            "endpoints",
            "create",
            "--url",
            &rx.url("/hooks"),
        ],
    );
    let id = ep["id"].as_str().unwrap().to_string();
    let id = id.as_str();
    let steps: [(&[&str], &str); 6] = [
        (
            &[
                "webhooks",
                "endpoints",
                "update",
                id,
                "--description",
                "billing",
            ],
            "webhook.endpoint.update",
        ),
        (
            &["webhooks", "endpoints", "disable", id],
            "webhook.endpoint.disable",
        ),
        (
            &["webhooks", "endpoints", "enable", id],
            "webhook.endpoint.enable",
        ),
        (
            &[
                "webhooks",
                "endpoints",
                "rotate-secret",
                id,
                "--overlap",
                "1h",
            ],
            "webhook.endpoint.rotate_secret",
        ),
        (
            &["webhooks", "endpoints", "show", id, "--show-secret"],
            "webhook.endpoint.show_secret",
        ),
        (
            &["webhooks", "endpoints", "delete", id],
            "webhook.endpoint.delete",
        ),
    ];
    for (args, _) in &steps[..4] {
        run_json(&url, args);
    }
    // Showing an endpoint without its secret reads nothing secret and records nothing.
    run_json(&url, &["webhooks", "endpoints", "show", id]);
    for (args, _) in &steps[4..] {
        run_json(&url, args);
    }
    let entries = audit_entries(&store).await;
    let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    let mut expected: Vec<&str> = steps.iter().rev().map(|(_, a)| *a).collect();
    expected.push("webhook.endpoint.create");
    assert_eq!(actions, expected);
    for e in &entries {
        assert_eq!(e.target["webhook_endpoint"], id, "{e:?}");
        assert!(e.actor.name.starts_with("cli:"), "{e:?}");
        assert_eq!(e.actor.key_id, None);
    }
}

async fn an_unserved_enqueue_warns_and_the_queue_shows_it(url: String, store: Arc<dyn Store>) {
    let api = Api::start(store.clone()).await;

    // No worker at all: both doors warn, and the job is enqueued all the same.
    let (status, answer) = api
        .post("/v1/jobs", json!({"kind": "demo.echo", "queue": "default"}))
        .await;
    assert_eq!(status, 201, "{answer}");
    let warning = answer["warnings"][0].as_str().unwrap().to_string();
    assert!(warning.contains("queue `default`"), "{warning}");
    let (code, out, err) = run(
        &url,
        &[
            "enqueue",
            "--kind",
            "demo.echo",
            "--args",
            r#"{"msg":"hi"}"#,
        ],
    );
    assert_eq!(code, 0, "a warning does not fail the enqueue: {err}");
    assert!(out.contains("enqueued"), "{out}");
    assert!(err.contains(&format!("warning: {warning}")), "{err}");

    let queues = run_json(&url, &["queues"]);
    assert_eq!(queues[0]["queue"], "default");
    assert_eq!(queues[0]["unserved"], true, "{queues}");
    let listed = api.get("/v1/queues").await;
    assert_eq!(listed[0]["unserved"], true, "{listed}");
    let (_, table, _) = run(&url, &["queues"]);
    assert!(table.contains("unserved"), "{table}");

    // `conveyor serve` runs the built-in queues with every built-in kind: nothing to warn.
    let mut serve = Process::spawn(conveyor(&url, &["serve", "--listen", "127.0.0.1:0"]));
    serve.wait_for_line("worker started", 60);
    eventually(30, "the worker registered", || {
        let s = store.clone();
        async move {
            let w = conveyor_worker::store::meta::list_all(s.as_ref(), "workers")
                .await
                .ok()?;
            (!w.is_empty()).then_some(())
        }
    })
    .await;
    let (code, _, err) = run(
        &url,
        &[
            "enqueue",
            "--kind",
            "demo.echo",
            "--args",
            r#"{"msg":"hi"}"#,
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        !err.contains("warning"),
        "a served kind does not warn: {err}"
    );
    // The API process reads registrations at most once a second (they are on every
    // enqueue's path): a worker that just started is seen within that.
    eventually(10, "the API sees the new worker", || {
        let api = &api;
        async move {
            let (status, answer) = api.post("/v1/jobs", json!({"kind": "demo.echo"})).await;
            assert_eq!(status, 201);
            (answer["warnings"] == json!([])).then_some(())
        }
    })
    .await;

    // A kind no worker has a handler for, on a served queue: warned about by name.
    let (_, _, err) = run(&url, &["enqueue", "--kind", "email.sendd"]);
    assert!(
        err.contains("warning:") && err.contains("kind `email.sendd`"),
        "{err}"
    );
    // A queue no worker runs.
    let (status, answer) = api
        .post("/v1/jobs", json!({"kind": "demo.echo", "queue": "reports"}))
        .await;
    assert_eq!(status, 201);
    assert!(
        answer["warnings"][0]
            .as_str()
            .unwrap()
            .contains("queue `reports`"),
        "{answer}"
    );
    let queues = run_json(&url, &["queues"]);
    let unserved: Vec<(&str, bool)> = queues
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            (
                q["queue"].as_str().unwrap(),
                q["unserved"].as_bool().unwrap(),
            )
        })
        .collect();
    assert!(unserved.contains(&("reports", true)), "{unserved:?}");
    assert!(unserved.contains(&("default", false)), "{unserved:?}");
    assert_eq!(serve.stop(Signal::SIGTERM, 30), Some(0));
}

async fn queues_pause_and_resume_from_the_cli(url: String, store: Arc<dyn Store>) {
    store
        .enqueue(conveyor_worker::NewJob::new("demo.echo", json!({})).queue("reports"))
        .await
        .unwrap();
    let paused = |queues: &Value| {
        queues
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["queue"] == "reports")
            .map(|q| q["paused"].clone())
    };
    let (code, out, err) = run(&url, &["queues", "pause", "reports"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("paused queue `reports`"), "{out}");
    assert_eq!(paused(&run_json(&url, &["queues"])), Some(json!(true)));
    let entries = audit_entries(&store).await;
    assert_eq!(entries[0].action, "queue.pause", "{entries:?}");
    assert!(entries[0].actor.name.starts_with("cli:"), "{entries:?}");

    let resumed = run_json(&url, &["queues", "resume", "reports"]);
    assert_eq!(resumed["paused"], false, "{resumed}");
    assert_eq!(paused(&run_json(&url, &["queues"])), Some(json!(false)));
    assert_eq!(audit_entries(&store).await[0].action, "queue.resume");

    // A bad name is refused by the admin layer's rule, as over HTTP: exit 2 naming the field.
    let (code, _, err) = run(&url, &["queues", "pause", "no spaces"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("queue"), "{err}");
}
