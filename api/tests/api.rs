//! The HTTP API against a real server on `127.0.0.1:0`, on every backend: enqueue, get, list,
//! the scope matrix, the audit trail, bulk actions, pause, rate limits, metrics, bad input,
//! the OpenAPI document.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Server, send};
use conveyor_api::ApiConfig;
use conveyor_api::key::Scope;
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::{JobState, NewJob, Outcome, Registry, Store};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

api_tests!(
    enqueue_get_and_list,
    batch_enqueue,
    scope_matrix,
    audit_trail,
    bulk_actions_count_first,
    paused_queue_accepts_but_runs_nothing,
    rate_limit_is_shared_between_replicas,
    metrics_need_a_key_and_name_everything,
    metrics_report_the_store_workers_and_webhook_endpoints,
    bad_input_gets_a_problem,
    schedules_over_http,
    secrets_in_args_are_shown_to_admin_keys_only,
);

async fn secrets_in_args_are_shown_to_admin_keys_only(store: Arc<dyn Store>) {
    let s = Server::default(store).await;
    let enq = s.key(Scope::Enqueue).await;
    let read = s.key(Scope::Read).await;
    let op = s.key(Scope::Operate).await;
    let admin = s.key(Scope::Admin).await;
    let args = json!({"to": "a@example.com", "smtp": {"password": "hunter2"}, "apiKey": "k1"});
    let (status, body) = send(
        s.req(Method::POST, "/v1/jobs", Some(&enq))
            .json(&json!({"kind": "s.secret", "queue": "secrets", "args": args})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = body["job"]["id"].as_str().unwrap().to_string();
    let redacted =
        json!({"to": "a@example.com", "smtp": {"password": "[redacted]"}, "apiKey": "[redacted]"});
    for key in [&read, &op] {
        let (status, job) = send(s.req(Method::GET, &format!("/v1/jobs/{id}"), Some(key))).await;
        assert_eq!(status, 200);
        assert_eq!(job["args"], redacted);
        let (_, page) = send(s.req(Method::GET, "/v1/jobs?queue=secrets", Some(key))).await;
        assert_eq!(page["jobs"][0]["args"], redacted);
    }
    let (_, job) = send(s.req(Method::GET, &format!("/v1/jobs/{id}"), Some(&admin))).await;
    assert_eq!(job["args"], args, "an admin key sees the args as enqueued");
    // The job itself keeps its args: redaction is only what a key is shown.
    let (_, page) = send(s.req(Method::GET, "/v1/jobs?queue=secrets", Some(&admin))).await;
    assert_eq!(page["jobs"][0]["args"], args);
}

async fn schedules_over_http(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let op = s.key(Scope::Operate).await;
    let admin = s.key(Scope::Admin).await;

    // Create: 201 with a Location and the status (no fire yet, a next fire in its zone).
    let r = s
        .req(Method::POST, "/v1/schedules", Some(&op))
        .json(&json!({
            "name": "nightly",
            "cron": "30 2 * * *",
            "timezone": "Europe/Berlin",
            "kind": "report.build",
            "args": {"format": "pdf"},
            "missed": "all",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["location"], "/v1/schedules/nightly");
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["spec"]["timezone"], "Europe/Berlin");
    assert_eq!(created["spec"]["missed"], "all");
    assert_eq!(created["origin"], "api");
    assert!(created["last_fire"].is_null());
    assert!(created["next_fire"].is_string());
    let version = created["version"].as_i64().unwrap();

    // The same name again: 409. Bad fields: 422 naming the field.
    let (status, p) = send(
        s.req(Method::POST, "/v1/schedules", Some(&op))
            .json(&json!({"name": "nightly", "cron": "* * * * *", "kind": "k"})),
    )
    .await;
    assert_eq!(status, 409, "{p}");
    for (body, field) in [
        (
            json!({"name": "x", "cron": "61 * * * *", "kind": "k"}),
            "cron",
        ),
        (
            json!({"name": "x", "cron": "* * * * *", "kind": "k", "timezone": "Mars/Base"}),
            "timezone",
        ),
        (
            json!({"name": "x", "cron": "* * * * *", "kind": "k", "missed": "sometimes"}),
            "missed",
        ),
        (
            json!({"name": "x y", "cron": "* * * * *", "kind": "k"}),
            "name",
        ),
        (json!({"cron": "* * * * *"}), "name"),
    ] {
        let (status, p) = send(s.req(Method::POST, "/v1/schedules", Some(&op)).json(&body)).await;
        assert_eq!(status, 422, "{body}: {p}");
        assert!(
            p["errors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["field"] == field),
            "{body}: {p}"
        );
    }
    let (status, p) = send(
        s.req(Method::POST, "/v1/schedules", Some(&op))
            .json(&json!({"name": "x", "cron": "* * * * *", "kind": "k", "colour": "red"})),
    )
    .await;
    assert_eq!(status, 422, "unknown fields are refused: {p}");

    // Update with the version read; a stale If-Match is a 409 and changes nothing.
    let (status, updated) = send(
        s.req(Method::PATCH, "/v1/schedules/nightly", Some(&op))
            .header("if-match", version.to_string())
            .json(&json!({"cron": "0 3 * * *"})),
    )
    .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["spec"]["cron"], "0 3 * * *");
    assert_eq!(
        updated["spec"]["timezone"], "Europe/Berlin",
        "untouched fields stay"
    );
    let (status, p) = send(
        s.req(Method::PATCH, "/v1/schedules/nightly", Some(&op))
            .header("if-match", version.to_string())
            .json(&json!({"cron": "0 4 * * *"})),
    )
    .await;
    assert_eq!(status, 409, "{p}");

    // Next fire times in the zone, across the spring change (03:00 exists; 02:30 would not).
    let (status, next) = send(s.req(
        Method::GET,
        "/v1/schedules/nightly/next?count=2&after=2027-03-27T12:00:00Z",
        Some(&op),
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        next,
        json!({
            "times": ["2027-03-28T03:00:00+02:00", "2027-03-29T03:00:00+02:00"],
            "exhausted": false,
            "note": null
        })
    );
    // Past the end of the supported range (the year 2100) fewer times remain than asked,
    // and the answer says so rather than leave a short list unexplained.
    let (status, next) = send(s.req(
        Method::GET,
        "/v1/schedules/nightly/next?count=10&after=2100-12-28T12:00:00Z",
        Some(&op),
    ))
    .await;
    assert_eq!(status, 200);
    let times = next["times"].as_array().expect("times").len();
    assert!(times < 10, "{next}");
    assert_eq!(next["exhausted"], json!(true), "{next}");
    let note = next["note"].as_str().expect("a note");
    assert!(
        note.contains(&format!("`nightly` fires only {times} time(s)")),
        "{note}"
    );

    // Pause, trigger (runs even when paused), resume, delete; 404 for unknown names.
    let (status, paused) =
        send(s.req(Method::POST, "/v1/schedules/nightly/pause", Some(&op))).await;
    assert_eq!(status, 200);
    assert_eq!(paused["spec"]["enabled"], false);
    assert!(paused["next_fire"].is_null());
    let r = s
        .req(Method::POST, "/v1/schedules/nightly/trigger", Some(&op))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let job: Value = r.json().await.unwrap();
    let id: conveyor_worker::JobId = job["id"].as_str().unwrap().parse().unwrap();
    let stored = store.get(id).await.unwrap().unwrap();
    assert_eq!(stored.kind, "report.build");
    assert_eq!(stored.args, json!({"format": "pdf"}));
    let (status, _) = send(s.req(Method::POST, "/v1/schedules/nightly/resume", Some(&op))).await;
    assert_eq!(status, 200);
    let (status, list) = send(s.req(Method::GET, "/v1/schedules", Some(&op))).await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["spec"]["enabled"], true);
    let (status, _) = send(s.req(Method::DELETE, "/v1/schedules/nightly", Some(&op))).await;
    assert_eq!(status, 204);
    let (status, p) = send(s.req(Method::GET, "/v1/schedules/nightly", Some(&op))).await;
    assert_eq!(status, 404, "{p}");

    // Every change is in the audit log.
    let (_, page) = send(s.req(Method::GET, "/v1/audit?limit=20", Some(&admin))).await;
    let actions: Vec<&str> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .filter(|a| a.starts_with("schedule."))
        .collect();
    assert_eq!(
        actions,
        [
            "schedule.delete",
            "schedule.resume",
            "schedule.trigger",
            "schedule.pause",
            "schedule.update",
            "schedule.create"
        ]
    );
}

async fn enqueue_get_and_list(store: Arc<dyn Store>) {
    let s = Server::default(store).await;
    let key = s.key(Scope::Admin).await;
    let body = json!({"kind": "demo.echo", "queue": "mail", "args": {"msg": "hi"}, "tags": ["a"]});

    let response = s
        .req(Method::POST, "/v1/jobs", Some(&key))
        .header("Idempotency-Key", "order-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["duplicate"], false);
    let id = created["job"]["id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/v1/jobs/{id}"));
    assert_eq!(created["job"]["idempotency_key"], "order-1");

    // The same key as a field: the existing job, 200, marked.
    let mut again = body.clone();
    again["idempotency_key"] = json!("order-1");
    let response = s
        .req(Method::POST, "/v1/jobs", Some(&key))
        .json(&again)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    let dup: Value = response.json().await.unwrap();
    assert_eq!(dup["duplicate"], true);
    assert_eq!(dup["job"]["id"], id.as_str());

    let (status, job) = send(s.req(Method::GET, &location, Some(&key))).await;
    assert_eq!(status, 200);
    assert_eq!(job["state"], "available");
    assert_eq!(job["args"]["msg"], "hi");
    assert_eq!(job["attempts"], json!([]));
    let (status, _) = send(s.req(Method::GET, &format!("/v1/jobs/job_{id}"), Some(&key))).await;
    assert_eq!(status, 200, "the job_ prefixed id works too");

    // Listing with filters and a cursor.
    for i in 0..5 {
        let (st, _) = send(
            s.req(Method::POST, "/v1/jobs", Some(&key))
                .json(&json!({"kind": "demo.echo", "queue": "bulk", "args": {"i": i}})),
        )
        .await;
        assert_eq!(st, 201);
    }
    let (status, page) = send(s.req(Method::GET, "/v1/jobs?queue=bulk&limit=3", Some(&key))).await;
    assert_eq!(status, 200);
    assert_eq!(page["jobs"].as_array().unwrap().len(), 3);
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let (_, page2) = send(s.req(
        Method::GET,
        &format!("/v1/jobs?queue=bulk&limit=3&cursor={cursor}"),
        Some(&key),
    ))
    .await;
    assert_eq!(page2["jobs"].as_array().unwrap().len(), 2);
    assert!(page2["next_cursor"].is_null());
    let (_, tagged) = send(s.req(
        Method::GET,
        "/v1/jobs?tag=a&state=available,scheduled",
        Some(&key),
    ))
    .await;
    assert_eq!(tagged["jobs"].as_array().unwrap().len(), 1);
    let (_, none) = send(s.req(Method::GET, "/v1/jobs?state=dead", Some(&key))).await;
    assert_eq!(none["jobs"], json!([]));

    let (status, p) = send(s.req(
        Method::GET,
        "/v1/jobs/0193f5a2-7c1e-7b44-9a4e-2f1d3c4b5a69",
        Some(&key),
    ))
    .await;
    assert_eq!((status, p["code"].as_str()), (404, Some("not-found")));
}

async fn batch_enqueue(store: Arc<dyn Store>) {
    let s = Server::default(store).await;
    let key = s.key(Scope::Enqueue).await;
    let jobs: Vec<Value> = (0..3)
        .map(|i| json!({"kind": "demo.echo", "args": {"i": i}}))
        .collect();
    let (status, answer) = send(
        s.req(Method::POST, "/v1/jobs/batch", Some(&key))
            .header("Idempotency-Key", "batch-1")
            .json(&json!({ "jobs": jobs })),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(answer["inserted"], 3);
    let (status, answer) = send(
        s.req(Method::POST, "/v1/jobs/batch", Some(&key))
            .header("Idempotency-Key", "batch-1")
            .json(&json!({ "jobs": jobs })),
    )
    .await;
    assert_eq!(status, 200, "every job was a duplicate");
    assert_eq!(answer["duplicates"], 3);

    let too_many: Vec<Value> = (0..1001).map(|_| json!({"kind": "demo.echo"})).collect();
    let (status, p) = send(
        s.req(Method::POST, "/v1/jobs/batch", Some(&key))
            .json(&json!({ "jobs": too_many })),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(p["errors"][0]["field"], "jobs");

    let (status, p) = send(
        s.req(Method::POST, "/v1/jobs/batch", Some(&key))
            .json(&json!({ "jobs": [{"kind": "ok"}, {"kind": "bad kind"}] })),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(p["errors"][0]["field"], "jobs[1].kind");
    assert_eq!(
        s.store.count(&Default::default()).await.unwrap(),
        3,
        "a bad batch inserts nothing"
    );
}

/// Every route, and which scopes may call it (enqueue, read, operate, admin). `{id}` is
/// replaced by a fresh waiting job for each call, `{name}` names a queue and a schedule that
/// exist, `{n}` in a body is a fresh number. `None`: open to anyone without a key.
#[allow(clippy::type_complexity)]
const MATRIX: &[(&str, &str, Option<&str>, Option<[bool; 4]>)] = &[
    (
        "POST",
        "/v1/jobs",
        Some(r#"{"kind":"m.x"}"#),
        Some([true, false, false, true]),
    ),
    (
        "POST",
        "/v1/jobs/batch",
        Some(r#"{"jobs":[{"kind":"m.x"}]}"#),
        Some([true, false, false, true]),
    ),
    ("GET", "/v1/jobs", None, Some([false, true, true, true])),
    (
        "GET",
        "/v1/jobs/events",
        None,
        Some([false, true, true, true]),
    ),
    (
        "GET",
        "/v1/jobs/{id}",
        None,
        Some([false, true, true, true]),
    ),
    (
        "GET",
        "/v1/jobs/{id}/http-attempts",
        None,
        Some([false, true, true, true]),
    ),
    (
        "POST",
        "/v1/emails",
        Some(r#"{"from":"a@example.com","to":["b@example.com"],"subject":"s","text":"t"}"#),
        Some([true, false, false, true]),
    ),
    (
        "GET",
        "/v1/emails/{id}",
        None,
        Some([false, true, true, true]),
    ),
    (
        "POST",
        "/v1/email-templates",
        Some(r#"{"name":"matrix","subject":"Hi {{ who }}","text":"t"}"#),
        Some([false, false, true, true]),
    ),
    (
        "GET",
        "/v1/email-templates",
        None,
        Some([false, true, true, true]),
    ),
    (
        "GET",
        "/v1/email-templates/{name}",
        None,
        Some([false, true, true, true]),
    ),
    (
        "GET",
        "/v1/email-templates/{name}/versions",
        None,
        Some([false, true, true, true]),
    ),
    (
        "POST",
        "/v1/email-templates/{name}/preview",
        Some(r#"{"data":{"who":"you"}}"#),
        Some([false, true, true, true]),
    ),
    (
        "DELETE",
        "/v1/email-templates/{name}",
        None,
        Some([false, false, true, true]),
    ),
    (
        "POST",
        "/v1/email-suppressions",
        Some(r#"{"address":"matrix@example.com"}"#),
        Some([false, false, true, true]),
    ),
    (
        "GET",
        "/v1/email-suppressions",
        None,
        Some([false, true, true, true]),
    ),
    (
        "DELETE",
        "/v1/email-suppressions/{address}",
        None,
        Some([false, false, true, true]),
    ),
    (
        "GET",
        "/v1/stats/jobs",
        None,
        Some([false, true, true, true]),
    ),
    (
        "GET",
        "/v1/stats/webhooks",
        None,
        Some([false, true, true, true]),
    ),
    (
        "POST",
        "/v1/backups",
        Some(r#"{"source":"matrix"}"#),
        Some([false, false, false, true]),
    ),
    (
        "GET",
        "/v1/backups",
        None,
        Some([false, false, false, true]),
    ),
    (
        "GET",
        "/v1/backups/{id}",
        None,
        Some([false, false, false, true]),
    ),
    (
        "POST",
        "/v1/backups/{id}/verify",
        Some(r#"{"restore":true}"#),
        Some([false, false, false, true]),
    ),
    (
        "POST",
        "/v1/backups/prune",
        Some(r#"{"dry_run":true}"#),
        Some([false, false, false, true]),
    ),
    (
        "POST",
        "/v1/jobs/{id}/retry",
        None,
        Some([false, false, true, true]),
    ),
    (
        "POST",
        "/v1/jobs/{id}/cancel",
        None,
        Some([false, false, true, true]),
    ),
    (
        "DELETE",
        "/v1/jobs/{id}",
        None,
        Some([false, false, true, true]),
    ),
    (
        "POST",
        "/v1/jobs/bulk/{action}",
        Some(r#"{"filter":{"queue":"none"},"dry_run":true}"#),
        Some([false, false, true, true]),
    ),
    ("GET", "/v1/queues", None, Some([false, true, true, true])),
    (
        "POST",
        "/v1/queues/{name}/pause",
        None,
        Some([false, false, true, true]),
    ),
    (
        "POST",
        "/v1/queues/{name}/resume",
        None,
        Some([false, false, true, true]),
    ),
    ("GET", "/v1/workers", None, Some([false, true, true, true])),
    (
        "POST",
        "/v1/workers/claim",
        Some(r#"{"worker_id":"m","queues":["matrix"]}"#),
        Some([false, false, false, true]),
    ),
    (
        "POST",
        "/v1/workers/heartbeat",
        Some(r#"{"worker_id":"m","job_ids":[]}"#),
        Some([false, false, false, true]),
    ),
    (
        "POST",
        "/v1/workers/finish",
        Some(
            r#"{"worker_id":"m","items":[{"id":"0193f5a2-7c1e-7b44-9a4e-2f1d3c4b5a69","attempt":1,"outcome":"complete"}]}"#,
        ),
        Some([false, false, false, true]),
    ),
    (
        "POST",
        "/v1/workers/jobs/{id}/complete",
        Some(r#"{"worker_id":"m","attempt":1}"#),
        Some([false, false, false, true]),
    ),
    (
        "POST",
        "/v1/workers/jobs/{id}/fail",
        Some(r#"{"worker_id":"m","attempt":1,"error":{"message":"x"}}"#),
        Some([false, false, false, true]),
    ),
    (
        "POST",
        "/v1/workers/jobs/{id}/snooze",
        Some(r#"{"worker_id":"m","attempt":1,"seconds":1}"#),
        Some([false, false, false, true]),
    ),
    (
        "POST",
        "/v1/workers/jobs/{id}/progress",
        Some(r#"{"worker_id":"m","attempt":1,"percent":50}"#),
        Some([false, false, false, true]),
    ),
    (
        "GET",
        "/v1/schedules",
        None,
        Some([false, true, true, true]),
    ),
    (
        "POST",
        "/v1/schedules",
        Some(r#"{"name":"m-{n}","cron":"0 * * * *","kind":"m.x"}"#),
        Some([false, false, true, true]),
    ),
    (
        "GET",
        "/v1/schedules/{name}",
        None,
        Some([false, true, true, true]),
    ),
    (
        "PATCH",
        "/v1/schedules/{name}",
        Some(r#"{"priority":1}"#),
        Some([false, false, true, true]),
    ),
    (
        "DELETE",
        "/v1/schedules/{name}",
        None,
        Some([false, false, true, true]),
    ),
    (
        "POST",
        "/v1/schedules/{name}/pause",
        None,
        Some([false, false, true, true]),
    ),
    (
        "POST",
        "/v1/schedules/{name}/resume",
        None,
        Some([false, false, true, true]),
    ),
    (
        "POST",
        "/v1/schedules/{name}/trigger",
        None,
        Some([false, false, true, true]),
    ),
    (
        "GET",
        "/v1/schedules/{name}/next",
        None,
        Some([false, true, true, true]),
    ),
    ("GET", "/v1/audit", None, Some([false, false, false, true])),
    ("GET", "/metrics", None, Some([false, true, true, true])),
    ("GET", "/livez", None, None),
    ("GET", "/readyz", None, None),
    ("GET", "/v1/docs", None, None),
    ("GET", "/v1/openapi.json", None, None),
    // Public: the link in an email (its token signed with the server's keys) needs no key.
    ("GET", "/v1/unsubscribe/{token}", None, None),
    ("POST", "/v1/unsubscribe/{token}", None, None),
    (
        "GET",
        "/v1/webhooks/endpoints",
        None,
        Some([false, true, true, true]),
    ),
    (
        "POST",
        "/v1/webhooks/endpoints",
        Some(r#"{"url":"https://example.com/hook"}"#),
        Some([false, false, true, true]),
    ),
    (
        "GET",
        "/v1/webhooks/endpoints/{endpoint}",
        None,
        Some([false, true, true, true]),
    ),
    (
        "PATCH",
        "/v1/webhooks/endpoints/{endpoint}",
        Some(r#"{"description":"m"}"#),
        Some([false, false, true, true]),
    ),
    (
        "DELETE",
        "/v1/webhooks/endpoints/{endpoint}",
        None,
        Some([false, false, true, true]),
    ),
    (
        "GET",
        "/v1/webhooks/endpoints/{endpoint}/secret",
        None,
        Some([false, false, false, true]),
    ),
    (
        "POST",
        "/v1/webhooks/endpoints/{endpoint}/rotate-secret",
        Some("{}"),
        Some([false, false, false, true]),
    ),
    (
        "POST",
        "/v1/webhooks/endpoints/{endpoint}/enable",
        None,
        Some([false, false, true, true]),
    ),
    (
        "POST",
        "/v1/webhooks/endpoints/{endpoint}/disable",
        None,
        Some([false, false, true, true]),
    ),
    (
        "GET",
        "/v1/webhooks/endpoints/{endpoint}/attempts",
        None,
        Some([false, true, true, true]),
    ),
    (
        "GET",
        "/v1/webhooks/endpoints/{endpoint}/health",
        None,
        Some([false, true, true, true]),
    ),
    (
        "POST",
        "/v1/webhooks/endpoints/{endpoint}/replay",
        Some(r#"{"since":"2020-01-01T00:00:00Z"}"#),
        Some([false, false, true, true]),
    ),
    (
        "POST",
        "/v1/webhooks/deliveries/{delivery}/replay",
        None,
        Some([false, false, true, true]),
    ),
    (
        "POST",
        "/v1/webhooks/messages",
        Some(r#"{"url":"https://example.com/m","type":"matrix.m"}"#),
        Some([true, false, false, true]),
    ),
    (
        "POST",
        "/v1/events",
        Some(r#"{"type":"matrix.e","payload":{"n":"{n}"}}"#),
        Some([true, false, false, true]),
    ),
    (
        "GET",
        "/v1/events/{event}",
        None,
        Some([false, true, true, true]),
    ),
    (
        "GET",
        "/v1/events/{event}/attempts",
        None,
        Some([false, true, true, true]),
    ),
    (
        "POST",
        "/v1/events/{event}/replay",
        None,
        Some([false, false, true, true]),
    ),
];

/// The scopes of MATRIX's columns, then `worker`, whose key may call the remote-worker
/// routes (`POST /v1/workers/…`) and nothing else.
const MATRIX_SCOPES: [Scope; 5] = [
    Scope::Enqueue,
    Scope::Read,
    Scope::Operate,
    Scope::Admin,
    Scope::Worker,
];

/// Backup settings with a SQLite source `matrix` and one complete backup of it, in a fresh
/// directory (returned, with the backup's id).
async fn matrix_backups() -> (Arc<conveyor_backup::Backups>, std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!(
        "conveyor-api-matrix-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("matrix.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=rwc", db.display()))
        .await
        .unwrap();
    sqlx::query("CREATE TABLE t (x INTEGER)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let mut config = conveyor_backup::BackupConfig {
        destination: "here".into(),
        ..Default::default()
    };
    config.destinations.insert(
        "here".into(),
        conveyor_backup::DestinationConfig::Dir {
            path: dir.join("backups"),
        },
    );
    config.sources.insert(
        "matrix".into(),
        conveyor_backup::SourceConfig::Sqlite { path: db },
    );
    config.retention.keep_last = 1;
    let backups = conveyor_backup::Backups::new(config, "sqlite://unused.db").unwrap();
    let id = backups.create("matrix", None).await.unwrap().id;
    (Arc::new(backups), dir, id)
}

async fn scope_matrix(store: Arc<dyn Store>) {
    let (backups, backup_dir, backup_id) = matrix_backups().await;
    let s = Server::start_with(store.clone(), ApiConfig::default(), Some(backups)).await;
    let mut keys = Vec::new();
    for scope in MATRIX_SCOPES {
        keys.push(s.key(scope).await);
    }
    let schedules = conveyor_scheduler::Schedules::new(store.clone());
    let mut n = 0;
    for (method, template, body, allowed) in MATRIX {
        let method: Method = method.parse().unwrap();
        for who in 0..=MATRIX_SCOPES.len() {
            let key = keys.get(who).map(String::as_str);
            if schedules.get("matrix").await.unwrap().is_none() {
                schedules
                    .create(
                        conveyor_scheduler::schedule::ScheduleSpec::new(
                            "matrix",
                            "0 * * * *",
                            "m.x",
                        ),
                        conveyor_scheduler::registry::Origin::Api,
                    )
                    .await
                    .unwrap();
            }
            // A template and a suppression the reads and deletes find.
            if conveyor_jobs::email::template::get(store.as_ref(), "matrix", None)
                .await
                .unwrap()
                .is_none()
            {
                conveyor_jobs::email::template::create(
                    store.as_ref(),
                    serde_json::from_value(
                        json!({"name": "matrix", "subject": "Hi {{ who }}", "text": "t"}),
                    )
                    .unwrap(),
                )
                .await
                .unwrap();
            }
            conveyor_jobs::email::suppression::add(
                store.as_ref(),
                serde_json::from_value(json!({"address": "matrix@example.com"})).unwrap(),
            )
            .await
            .unwrap();
            n += 1;
            let id = store
                .enqueue(NewJob::new("m.x", json!({})).queue("matrix"))
                .await
                .unwrap()
                .id;
            let hooks = conveyor_jobs::webhook::Webhooks::new(
                store.clone(),
                conveyor_jobs::webhook::WebhookConfig::default(),
            )
            .unwrap()
            .with_keyring(conveyor_tests::test_keyring());
            let endpoint = hooks
                .create_endpoint(conveyor_jobs::webhook::endpoint::NewEndpoint {
                    url: "https://example.com/matrix".into(),
                    event_types: vec!["matrix.none".into()],
                    ..Default::default()
                })
                .await
                .unwrap();
            let event = hooks
                .send_to_url("https://example.com/matrix", "matrix.e", json!({}))
                .await
                .unwrap();
            let delivery: conveyor_worker::JobId = event.deliveries[0].job_id.parse().unwrap();
            store.cancel(delivery).await.unwrap();
            let email = store
                .enqueue(
                    NewJob::new(conveyor_jobs::email::KIND, json!({"subject": "matrix"}))
                        .queue("matrix"),
                )
                .await
                .unwrap()
                .id;
            // An email's id is an `email.send` job's.
            let id = if template.starts_with("/v1/emails/") {
                email.to_string()
            } else if template.starts_with("/v1/backups/{id}") {
                backup_id.clone()
            } else {
                id.to_string()
            };
            let path = template
                .replace("{endpoint}", &endpoint.id)
                .replace("{event}", &event.id)
                .replace("{delivery}", &delivery.to_string())
                .replace("{id}", &id)
                .replace("{action}", "retry")
                .replace("{address}", "matrix@example.com")
                .replace("{name}", "matrix")
                .replace(
                    "{token}",
                    &conveyor_jobs::email::unsubscribe::token(
                        &conveyor_tests::test_keyring(),
                        "matrix@example.com",
                        "matrix",
                    )
                    .unwrap(),
                );
            let mut r = s.req(method.clone(), &path, key);
            if let Some(b) = body {
                r = r
                    .header("content-type", "application/json")
                    .body(b.replace("{n}", &n.to_string()));
            }
            // The event stream never ends: its status is all there is to read.
            let (status, problem) = if path == "/v1/jobs/events" {
                let response = r.send().await.unwrap();
                let status = response.status().as_u16();
                if response.status().is_success() {
                    (status, Value::Null)
                } else {
                    (status, response.json().await.unwrap_or(Value::Null))
                }
            } else {
                send(r).await
            };
            let who_name = MATRIX_SCOPES
                .get(who)
                .map_or("no key".into(), |s| s.to_string());
            let remote = method == Method::POST && template.starts_with("/v1/workers/");
            let expected = match (allowed, key) {
                (None, _) => "ok",
                (Some(_), None) => "401",
                (Some(_), Some(_)) if who == 4 && remote => "ok",
                (Some(row), Some(_)) if who < 4 && row[who] => "ok",
                (Some(_), Some(_)) => "403",
            };
            let got = match status {
                200..=299 => "ok",
                // Past the key check: the job was never claimed, so its outcome is refused.
                409 if template.starts_with("/v1/workers/jobs/") => "ok",
                401 => "401",
                403 => "403",
                other => panic!("{method} {path} as {who_name}: unexpected {other}: {problem}"),
            };
            assert_eq!(got, expected, "{method} {path} as {who_name}: {problem}");
            if got != "ok" {
                assert_eq!(problem["status"], status, "refusals are problem documents");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&backup_dir);
    // A revoked or made-up key is a 401 too.
    conveyor_api::key::revoke(&store, &keys[3], conveyor_api::audit::Actor::cli())
        .await
        .unwrap();
    let (status, p) = send(s.req(Method::GET, "/v1/jobs", Some(&keys[3]))).await;
    assert_eq!(
        (status, p["detail"].as_str()),
        (401, Some("the key was revoked"))
    );
    // Change the secret's last hex digit (to a different one: a key ending in 0 stays valid
    // with a 0).
    let swap = if keys[1].ends_with('0') { "1" } else { "0" };
    let forged = format!("{}{swap}", &keys[1][..keys[1].len() - 1]);
    let (status, _) = send(s.req(Method::GET, "/v1/jobs", Some(&forged))).await;
    assert_eq!(status, 401);
    let (status, _) = send(s.req(Method::GET, "/v1/jobs", Some("nonsense"))).await;
    assert_eq!(status, 401);
}

async fn audit_trail(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let op = s.key(Scope::Operate).await;
    let admin = s.key(Scope::Admin).await;
    let a = store
        .enqueue(NewJob::new("t.a", json!({})))
        .await
        .unwrap()
        .id;
    let b = store
        .enqueue(NewJob::new("t.b", json!({})))
        .await
        .unwrap()
        .id;
    for (method, path) in [
        (Method::POST, format!("/v1/jobs/{a}/cancel")),
        (Method::POST, format!("/v1/jobs/{a}/retry")),
        (Method::DELETE, format!("/v1/jobs/{b}")),
    ] {
        let (status, body) = send(s.req(method, &path, Some(&op))).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (status, _) = send(s.req(Method::POST, "/v1/queues/default/pause", Some(&op))).await;
    assert_eq!(status, 200);
    let (status, _) = send(
        s.req(Method::POST, "/v1/jobs/bulk/cancel", Some(&op))
            .json(&json!({"filter": {"kind": "t.a"}})),
    )
    .await;
    assert_eq!(status, 200);

    let (status, page) = send(s.req(Method::GET, "/v1/audit?limit=10", Some(&admin))).await;
    assert_eq!(status, 200);
    let entries = page["entries"].as_array().unwrap();
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    // Newest first; the two key creations come from the CLI actor.
    assert_eq!(
        actions,
        [
            "jobs.cancel",
            "queue.pause",
            "job.discard",
            "job.retry",
            "job.cancel",
            "key.create",
            "key.create"
        ]
    );
    let bulk = &entries[0];
    assert_eq!(bulk["actor"]["name"], "test-operate");
    assert_eq!(bulk["actor"]["address"], "127.0.0.1");
    assert_eq!(bulk["affected"], 1);
    assert_eq!(bulk["target"]["filter"]["kind"], "t.a");
    assert_eq!(entries[4]["target"]["ids"][0], a.to_string());
    assert!(entries[0]["actor"]["key_id"].is_string());

    // Paging, and nothing in the API deletes the log.
    let (_, first) = send(s.req(Method::GET, "/v1/audit?limit=2", Some(&admin))).await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, next) = send(s.req(
        Method::GET,
        &format!("/v1/audit?limit=2&cursor={cursor}"),
        Some(&admin),
    ))
    .await;
    assert_eq!(next["entries"][0]["action"], "job.discard");
    let (status, _) = send(s.req(Method::DELETE, "/v1/audit", Some(&admin))).await;
    assert_eq!(status, 405);
    let (status, _) = send(s.req(Method::GET, "/v1/audit", Some(&op))).await;
    assert_eq!(status, 403, "reading the audit log needs admin");
}

async fn bulk_actions_count_first(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let op = s.key(Scope::Operate).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(
            store
                .enqueue(NewJob::new("t.bulk", json!({})))
                .await
                .unwrap()
                .id,
        );
    }
    store
        .enqueue(NewJob::new("t.other", json!({})))
        .await
        .unwrap();

    let (status, p) = send(
        s.req(Method::POST, "/v1/jobs/bulk/cancel", Some(&op))
            .json(&json!({})),
    )
    .await;
    assert_eq!(status, 422, "an empty filter needs all: true: {p}");

    let dry = json!({"filter": {"kind": "t.bulk"}, "dry_run": true});
    let (status, answer) = send(
        s.req(Method::POST, "/v1/jobs/bulk/cancel", Some(&op))
            .json(&dry),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        (answer["matched"].as_u64(), answer["affected"].as_u64()),
        (Some(4), Some(0))
    );
    assert_eq!(
        store
            .count(&conveyor_worker::store::JobFilter::state(
                JobState::Cancelled
            ))
            .await
            .unwrap(),
        0
    );

    let real = json!({"filter": {"kind": "t.bulk"}});
    let (_, answer) = send(
        s.req(Method::POST, "/v1/jobs/bulk/cancel", Some(&op))
            .json(&real),
    )
    .await;
    assert_eq!(answer["affected"], 4);
    let (_, answer) = send(
        s.req(Method::POST, "/v1/jobs/bulk/retry", Some(&op))
            .json(&json!({"filter": {"kind": "t.bulk", "states": ["cancelled"]}, "dry_run": true})),
    )
    .await;
    assert_eq!(answer["matched"], 4);
    let (_, answer) = send(
        s.req(Method::POST, "/v1/jobs/bulk/discard", Some(&op))
            .json(&real),
    )
    .await;
    assert_eq!(answer["affected"], 4, "discard deletes finished jobs");
    for id in ids {
        assert!(store.get(id).await.unwrap().is_none());
    }
    let (_, answer) = send(
        s.req(Method::POST, "/v1/jobs/bulk/discard", Some(&op))
            .json(&json!({"filter": {"states": ["available"]}})),
    )
    .await;
    assert_eq!(answer["matched"], 0, "discard never touches waiting jobs");
    let (status, _) = send(
        s.req(Method::POST, "/v1/jobs/bulk/explode", Some(&op))
            .json(&real),
    )
    .await;
    assert_eq!(status, 404);
}

async fn paused_queue_accepts_but_runs_nothing(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let op = s.key(Scope::Admin).await;
    let (status, _) = send(s.req(Method::POST, "/v1/queues/slow/pause", Some(&op))).await;
    assert_eq!(status, 200);

    let mut registry = Registry::new();
    registry.register("t.ok", |_: Value, _| async { Ok(Outcome::Done) });
    let config = WorkerConfig {
        queues: vec![QueueConfig {
            name: "slow".into(),
            concurrency: 2,
        }],
        poll_interval: Duration::from_millis(100),
        ..WorkerConfig::default()
    };
    let worker_id = config.id.clone();
    let worker = Worker::new(store.clone(), registry, config).unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));

    let (status, created) = send(
        s.req(Method::POST, "/v1/jobs", Some(&op))
            .json(&json!({"kind": "t.ok", "queue": "slow"})),
    )
    .await;
    assert_eq!(status, 201, "a paused queue accepts jobs");
    let id: conveyor_worker::JobId = created["job"]["id"].as_str().unwrap().parse().unwrap();

    // The worker registers itself.
    let workers = conveyor_tests::eventually(5, "the worker registers", || async {
        let (_, w) = send(s.req(Method::GET, "/v1/workers", Some(&op))).await;
        w.as_array().filter(|a| !a.is_empty()).cloned()
    })
    .await;
    assert_eq!(workers[0]["id"], worker_id.as_str());
    assert_eq!(workers[0]["queues"][0]["name"], "slow");
    assert_eq!(workers[0]["queues"][0]["concurrency"], 2);
    assert_eq!(workers[0]["pid"], std::process::id());

    // Paused: two watch intervals pass and the job is still waiting.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        store.get(id).await.unwrap().unwrap().state,
        JobState::Available
    );
    let (_, queues) = send(s.req(Method::GET, "/v1/queues", Some(&op))).await;
    let slow = queues
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "slow")
        .unwrap()
        .clone();
    assert_eq!(slow["paused"], true);
    assert_eq!(slow["counts"]["available"], 1);

    let resumed = std::time::Instant::now();
    let (status, _) = send(s.req(Method::POST, "/v1/queues/slow/resume", Some(&op))).await;
    assert_eq!(status, 200);
    conveyor_tests::eventually(5, "the job runs after resume", || async {
        (store.get(id).await.unwrap().unwrap().state == JobState::Completed).then_some(())
    })
    .await;
    assert!(
        resumed.elapsed() < Duration::from_secs(3),
        "resume is prompt: {:?}",
        resumed.elapsed()
    );

    let series = conveyor_worker::metrics::global()
        .jobs
        .get(&["slow", "t.ok"]);
    assert!(
        series.completed.get() >= 1,
        "the runtime counts completions"
    );
    assert!(series.execution.count() >= 1 && series.queue_wait.count() >= 1);

    stop.cancel();
    run.await.unwrap().unwrap();
    let (_, w) = send(s.req(Method::GET, "/v1/workers", Some(&op))).await;
    assert_eq!(w, json!([]), "a worker that stopped deregisters");
}

async fn rate_limit_is_shared_between_replicas(store: Arc<dyn Store>) {
    let mut config = ApiConfig::default();
    config.rate_limit.per_second = 0.1;
    config.rate_limit.burst = 4.0;
    let a = Server::start(store.clone(), config.clone()).await;
    let b = Server::start(store.clone(), config).await;
    let key = a.key(Scope::Read).await;
    let other = a.key(Scope::Read).await;
    for (i, server) in [&a, &b, &a, &b].into_iter().enumerate() {
        let (status, _) = send(server.req(Method::GET, "/v1/queues", Some(&key))).await;
        assert_eq!(status, 200, "request {i}");
    }
    let response = b
        .req(Method::GET, "/v1/queues", Some(&key))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        429,
        "the fifth request in the burst, on the other replica"
    );
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry_after), "{retry_after}");
    let p: Value = response.json().await.unwrap();
    assert_eq!(p["code"], "rate-limited");
    let (status, _) = send(a.req(Method::GET, "/v1/queues", Some(&other))).await;
    assert_eq!(status, 200, "each key has its own bucket");
}

async fn metrics_need_a_key_and_name_everything(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let read = s.key(Scope::Read).await;
    let enq = s.key(Scope::Enqueue).await;
    send(
        s.req(Method::POST, "/v1/jobs", Some(&enq))
            .json(&json!({"kind": "m.metric", "queue": "mq"})),
    )
    .await;
    let (status, _) = send(s.req(Method::GET, "/metrics", None)).await;
    assert_eq!(status, 401);
    // A backup of `store` finished at 03:00 UTC (what `backup.run` and `backup create`
    // record in the store), never verified.
    let backup_status = json!({"last_success_at": "2026-12-02T03:00:00Z"});
    store
        .meta_put(conveyor_worker::store::meta::Put::new(
            conveyor_backup::status::COLLECTION,
            "store",
            &backup_status,
        ))
        .await
        .unwrap();
    let text = s
        .req(Method::GET, "/metrics", Some(&read))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "conveyor_jobs_enqueued_total{queue=\"mq\",kind=\"m.metric\"}",
        "# TYPE conveyor_jobs_completed_total counter",
        "# TYPE conveyor_jobs_failed_total counter",
        "# TYPE conveyor_jobs_retried_total counter",
        "# TYPE conveyor_jobs_dead_total counter",
        "# TYPE conveyor_job_execution_seconds histogram",
        "# TYPE conveyor_job_queue_wait_seconds histogram",
        "conveyor_queue_jobs{queue=\"mq\",state=\"available\"} 1",
        "conveyor_queue_oldest_available_age_seconds{queue=\"mq\"}",
        "# TYPE conveyor_lease_rescues_total counter",
        "conveyor_http_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"201\"}",
        "conveyor_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/jobs\",le=\"+Inf\"}",
        "# TYPE conveyor_backup_last_success_timestamp_seconds gauge",
        "conveyor_backup_last_success_timestamp_seconds{source=\"store\"} 1796180400.000",
        "# TYPE conveyor_backup_last_verified_timestamp_seconds gauge",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    assert!(
        !text.contains("conveyor_backup_last_verified_timestamp_seconds{"),
        "{text}"
    );

    // The separate, keyless metrics router.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app =
        conveyor_api::metrics_router(conveyor_api::AppState::new(store, ApiConfig::default()));
    tokio::spawn(conveyor_api::serve(listener, app, std::future::pending()));
    let r = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("conveyor_queue_jobs"));
}

/// What the alert rules read (deploy/prometheus/alerts.yml): the store answering, live
/// workers per queue, and each webhook endpoint's circuit and automatic disabling.
async fn metrics_report_the_store_workers_and_webhook_endpoints(store: Arc<dyn Store>) {
    use conveyor_jobs::webhook::endpoint::NewEndpoint;
    use conveyor_jobs::webhook::model::ENDPOINTS;
    use conveyor_jobs::webhook::{WebhookConfig, Webhooks};

    let s = Server::default(store.clone()).await;
    let read = s.key(Scope::Read).await;
    let scrape = || async {
        s.req(Method::GET, "/metrics", Some(&read))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    // Jobs wait on `lw_idle`, which no worker serves; a worker serves `lw_busy`.
    store
        .enqueue(NewJob::new("m.metric", json!({})).queue("lw_idle"))
        .await
        .unwrap();
    let mut registry = Registry::new();
    registry.register("m.metric", |_: Value, _| async { Ok(Outcome::Done) });
    let config = WorkerConfig {
        queues: vec![QueueConfig {
            name: "lw_busy".into(),
            concurrency: 2,
        }],
        ..WorkerConfig::default()
    };
    let stop = CancellationToken::new();
    let run = tokio::spawn(
        Worker::new(store.clone(), registry, config)
            .unwrap()
            .run(stop.clone()),
    );
    let text = conveyor_tests::eventually(5, "the worker shows on /metrics", || async {
        let text = scrape().await;
        text.contains("conveyor_queue_live_workers{queue=\"lw_busy\"} 1")
            .then_some(text)
    })
    .await;
    for line in [
        "# TYPE conveyor_store_up gauge",
        "conveyor_store_up 1",
        "# TYPE conveyor_queue_live_workers gauge",
        "conveyor_queue_live_workers{queue=\"lw_idle\"} 0",
        "# TYPE conveyor_webhook_endpoint_circuit_open gauge",
        "# TYPE conveyor_webhook_endpoint_auto_disabled gauge",
        "# TYPE conveyor_webhook_deliveries_total counter",
        "# TYPE conveyor_cron_fires_total counter",
        "# TYPE conveyor_cron_missed_ticks_total counter",
        "# TYPE conveyor_cron_fire_lag_seconds histogram",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    stop.cancel();
    run.await.unwrap().unwrap();

    // Three endpoints: one failing past the circuit threshold, one disabled for failing, one
    // disabled by an admin.
    let hooks = Webhooks::new(store.clone(), WebhookConfig::default())
        .unwrap()
        .with_keyring(conveyor_tests::test_keyring());
    let mut ids = Vec::new();
    for _ in 0..3 {
        let ep = hooks
            .create_endpoint(NewEndpoint {
                url: "https://receiver.example.com/hook".into(),
                ..NewEndpoint::default()
            })
            .await
            .unwrap();
        ids.push(ep.id);
    }
    let now = chrono::Utc::now();
    for _ in 0..WebhookConfig::default().circuit_threshold {
        hooks.record_failure(&ids[0], now, false).await.unwrap();
    }
    // As `webhooks.auto_disable_after` leaves it (the stored record, secrets sealed).
    let record = store.meta_get(ENDPOINTS, &ids[1]).await.unwrap().unwrap();
    let mut failing: Value = record.decode().unwrap();
    failing["enabled"] = json!(false);
    failing["disabled_reason"] = json!("failing since 2026-12-01T00:00:00Z");
    store
        .meta_put(conveyor_worker::store::meta::Put::new(
            ENDPOINTS, &ids[1], &failing,
        ))
        .await
        .unwrap();
    hooks.set_enabled(&ids[2], false).await.unwrap();
    let text = scrape().await;
    for (id, open, auto) in [(&ids[0], 1, 0), (&ids[1], 0, 1), (&ids[2], 0, 0)] {
        for line in [
            format!("conveyor_webhook_endpoint_circuit_open{{endpoint=\"{id}\"}} {open}"),
            format!("conveyor_webhook_endpoint_auto_disabled{{endpoint=\"{id}\"}} {auto}"),
        ] {
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
    }
}

/// A store that stops answering: `/metrics` still answers, with `conveyor_store_up 0` and the
/// process's own figures, so the alert on it can fire (a failed scrape would only say the
/// process is down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_say_when_the_store_is_unreachable() {
    let Some(mut redis) = conveyor_tests::redis_server::PrivateRedis::start(&[]).await else {
        return;
    };
    let store = conveyor_worker::store::connect(
        &redis.url(),
        conveyor_worker::store::StoreOptions::default(),
    )
    .await
    .unwrap();
    store
        .enqueue(NewJob::new("m.metric", json!({})).queue("down"))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app =
        conveyor_api::metrics_router(conveyor_api::AppState::new(store, ApiConfig::default()));
    tokio::spawn(conveyor_api::serve(listener, app, std::future::pending()));
    let scrape = || async {
        let r = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let (status, text) = scrape().await;
    assert_eq!(status, 200);
    assert!(text.contains("conveyor_store_up 1"), "{text}");
    assert!(
        text.contains("conveyor_queue_jobs{queue=\"down\",state=\"available\"} 1"),
        "{text}"
    );

    redis.kill();
    let (status, text) = scrape().await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("conveyor_store_up 0"), "{text}");
    assert!(
        text.contains("# TYPE conveyor_jobs_completed_total counter"),
        "{text}"
    );
    assert!(!text.contains("conveyor_queue_jobs{"), "{text}");
    let r = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    assert_eq!(r.status(), 503);
}

async fn bad_input_gets_a_problem(store: Arc<dyn Store>) {
    let config = ApiConfig {
        body_limit: 64 * 1024,
        args_limit: 1024,
        ..ApiConfig::default()
    };
    let s = Server::start(store.clone(), config).await;
    let key = s.key(Scope::Admin).await;
    let post = |body: &str| {
        s.req(Method::POST, "/v1/jobs", Some(&key))
            .header("content-type", "application/json")
            .body(body.to_string())
    };
    let far = (chrono::Utc::now() + chrono::Duration::days(3650)).to_rfc3339();
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, Option<&str>)> = vec![
        ("malformed JSON", post(r#"{"kind": "#), 400, None),
        ("not an object", post("[1,2]"), 422, None),
        ("wrong type", post(r#"{"kind": 5}"#), 422, Some("kind")),
        (
            "priority out of range",
            post(r#"{"kind":"a","priority":99999}"#),
            422,
            Some("priority"),
        ),
        (
            "unknown field",
            post(r#"{"kind":"a","colour":"red"}"#),
            422,
            Some("colour"),
        ),
        ("missing kind", post(r#"{"queue":"a"}"#), 422, None),
        (
            "a key ending in a space (a header could not carry it)",
            post(r#"{"kind":"a","idempotency_key":"k "}"#),
            422,
            Some("idempotency_key"),
        ),
        (
            "a tab in the Idempotency-Key header",
            post(r#"{"kind":"a"}"#).header("idempotency-key", "k\t1"),
            422,
            Some("Idempotency-Key"),
        ),
        (
            "unicode in the kind",
            post(r#"{"kind":"défaut"}"#),
            422,
            Some("kind"),
        ),
        (
            "unicode in the queue",
            post(r#"{"kind":"a","queue":"очередь"}"#),
            422,
            Some("queue"),
        ),
        (
            "empty queue",
            post(r#"{"kind":"a","queue":""}"#),
            422,
            Some("queue"),
        ),
        (
            "zero attempts",
            post(r#"{"kind":"a","max_attempts":0}"#),
            422,
            Some("max_attempts"),
        ),
        (
            "negative attempts",
            post(r#"{"kind":"a","max_attempts":-3}"#),
            422,
            Some("max_attempts"),
        ),
        (
            "run_at in ten years",
            post(&format!(r#"{{"kind":"a","run_at":"{far}"}}"#)),
            422,
            Some("run_at"),
        ),
        (
            "run_at not a time",
            post(r#"{"kind":"a","run_at":"tomorrow"}"#),
            422,
            Some("run_at"),
        ),
        (
            "metadata not an object",
            post(r#"{"kind":"a","metadata":[1]}"#),
            422,
            Some("metadata"),
        ),
        (
            "args over the limit",
            post(&format!(
                r#"{{"kind":"a","args":{{"s":"{}"}}}}"#,
                "x".repeat(2000)
            )),
            413,
            Some("args"),
        ),
        (
            "body over the limit",
            post(&format!(
                r#"{{"kind":"a","args":"{}"}}"#,
                "x".repeat(100_000)
            )),
            413,
            None,
        ),
        (
            "no content type",
            s.req(Method::POST, "/v1/jobs", Some(&key))
                .body(r#"{"kind":"a"}"#),
            415,
            None,
        ),
        (
            "negative limit",
            s.req(Method::GET, "/v1/jobs?limit=-1", Some(&key)),
            400,
            Some("limit"),
        ),
        (
            "zero limit",
            s.req(Method::GET, "/v1/jobs?limit=0", Some(&key)),
            422,
            Some("limit"),
        ),
        (
            "huge limit",
            s.req(Method::GET, "/v1/jobs?limit=5000", Some(&key)),
            422,
            Some("limit"),
        ),
        (
            "unknown state",
            s.req(Method::GET, "/v1/jobs?state=zombie", Some(&key)),
            422,
            Some("state"),
        ),
        (
            "unknown query parameter",
            s.req(Method::GET, "/v1/jobs?colour=red", Some(&key)),
            400,
            None,
        ),
        (
            "bad cursor",
            s.req(Method::GET, "/v1/jobs?cursor=abc", Some(&key)),
            422,
            Some("cursor"),
        ),
        (
            "bad time",
            s.req(Method::GET, "/v1/jobs?since=yesterday", Some(&key)),
            400,
            None,
        ),
        (
            "bad job id",
            s.req(Method::GET, "/v1/jobs/not-an-id", Some(&key)),
            400,
            Some("id"),
        ),
        (
            "bad queue name",
            s.req(Method::POST, "/v1/queues/%F0%9F%92%A5/pause", Some(&key)),
            422,
            Some("queue"),
        ),
        (
            "unknown route",
            s.req(Method::GET, "/v1/nothing", Some(&key)),
            404,
            None,
        ),
        (
            "wrong method",
            s.req(Method::DELETE, "/v1/jobs", Some(&key)),
            405,
            None,
        ),
        (
            "audit limit",
            s.req(Method::GET, "/v1/audit?limit=0", Some(&key)),
            422,
            Some("limit"),
        ),
    ];
    for (what, request, status, field) in cases {
        let response = request.send().await.unwrap();
        let got = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(
            content_type.as_deref(),
            Some("application/problem+json"),
            "{what}"
        );
        assert_eq!(body["status"], status, "{what}: {body}");
        assert!(
            body["type"]
                .as_str()
                .unwrap()
                .starts_with("urn:conveyor:problem:"),
            "{what}"
        );
        assert!(
            !body["title"].as_str().unwrap().is_empty()
                && !body["detail"].as_str().unwrap().is_empty(),
            "{what}"
        );
        if let Some(field) = field {
            assert_eq!(body["errors"][0]["field"], field, "{what}: {body}");
        }
    }
    assert_eq!(
        store.count(&Default::default()).await.unwrap(),
        0,
        "nothing bad was enqueued"
    );

    // A good request still works, and unicode in tags and args is fine.
    let (status, _) = send(post(
        r#"{"kind":"a","tags":["ünïcødé"],"args":{"msg":"日本"}}"#,
    ))
    .await;
    assert_eq!(status, 201);
}

/// The document is valid (every `$ref` resolves, it reads back as OpenAPI 3.1) and lists
/// exactly the routes of the scope matrix.
#[tokio::test]
async fn openapi_document_matches_the_routes() {
    let t = conveyor_tests::TestStore::sqlite().await;
    let s = Server::default(t.store.clone()).await;
    let (status, doc) = send(s.req(Method::GET, "/v1/openapi.json", None)).await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    // The paths read back as utoipa's model. (The component schemas are not read back:
    // utoipa cannot parse its own any-value schema `{}`, which `args` and `payload` are.)
    let _: utoipa::openapi::Paths =
        serde_json::from_value(doc["paths"].clone()).expect("reads back");
    assert_eq!(doc, serde_json::to_value(conveyor_api::openapi()).unwrap());

    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("{r}"));
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "dangling {r}"
        );
    }

    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push((method.to_uppercase(), path.clone()));
        }
    }
    documented.sort();
    let mut routed: Vec<(String, String)> = MATRIX
        .iter()
        .filter(|(_, p, _, _)| *p != "/v1/openapi.json")
        .map(|(m, p, _, _)| (m.to_string(), p.to_string()))
        .collect();
    routed.sort();
    assert_eq!(documented, routed, "the document lists exactly the routes");
    // Operation ids are unique (an OpenAPI requirement client generators rely on).
    let mut ids: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .map(|op| {
            op["operationId"]
                .as_str()
                .expect("every operation has an id")
        })
        .collect();
    let count = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), count, "duplicate operationId in {ids:?}");
    // Every success answer with a body states its schema (a client generator needs one);
    // the probes and the docs page answer text or HTML, and 204 has no body.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if ["/livez", "/readyz", "/v1/docs", "/metrics"].contains(&path.as_str()) {
                continue;
            }
            for (status, answer) in op["responses"].as_object().unwrap() {
                if status.starts_with('2') && status != "204" {
                    assert!(
                        answer["content"]
                            .as_object()
                            .is_some_and(|c| c.values().all(|media| media.get("schema").is_some())),
                        "{method} {path} {status} has no body schema: {answer}"
                    );
                }
            }
        }
    }
    // Every documented operation with a scope declares it as bearer security.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let open = ["/livez", "/readyz", "/v1/docs", "/v1/unsubscribe/{token}"]
                .contains(&path.as_str());
            assert_eq!(op.get("security").is_none(), open, "{method} {path}");
        }
    }
    let page = s.req(Method::GET, "/v1/docs", None).send().await.unwrap();
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.text().await.unwrap().contains("/v1/openapi.json"));
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    out.push(x.as_str().unwrap().to_string());
                } else {
                    collect_refs(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

/// Security headers are on every answer; CORS is off unless configured.
#[tokio::test]
async fn security_headers_and_cors() {
    let t = conveyor_tests::TestStore::sqlite().await;
    let s = Server::default(t.store.clone()).await;
    let r = s
        .req(Method::GET, "/v1/jobs", None)
        .header("Origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    let h = r.headers();
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert!(h.contains_key("content-security-policy"));
    assert!(
        !h.contains_key("access-control-allow-origin"),
        "CORS is off by default"
    );

    let config = ApiConfig {
        cors_origins: vec!["https://admin.example".into()],
        ..ApiConfig::default()
    };
    let s = Server::start(t.store.clone(), config).await;
    let r = s
        .req(Method::OPTIONS, "/v1/jobs", None)
        .header("Origin", "https://admin.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://admin.example"
    );
}

/// Only the platform creates `webhook.deliver` jobs, fills the `webhooks` queue and sends
/// `webhook.*` events: an `enqueue` key that could would forge signed deliveries.
#[tokio::test]
async fn reserved_kinds_queues_and_event_types_are_refused() {
    let t = conveyor_tests::TestStore::sqlite().await;
    let s = Server::default(t.store.clone()).await;
    let key = s.key(Scope::Enqueue).await;
    let forged = json!({
        "event_id": "evt_forged", "event_type": "invoice.paid",
        "created_at": "2026-01-01T00:00:00Z", "payload": {}, "endpoint_id": "ep_x"
    });
    let cases = [
        (
            "/v1/jobs",
            json!({"kind": "webhook.deliver", "args": forged}),
            "kind",
        ),
        (
            "/v1/jobs",
            json!({"kind": "demo.echo", "queue": "webhooks", "args": {"msg": "x"}}),
            "queue",
        ),
        (
            "/v1/jobs/batch",
            json!({"jobs": [{"kind": "demo.echo", "args": {"msg": "x"}}, {"kind": "webhook.deliver", "args": forged}]}),
            "jobs[1].kind",
        ),
        (
            "/v1/events",
            json!({"type": "webhook.endpoint.disabled", "payload": {}}),
            "event_type",
        ),
        (
            "/v1/webhooks/messages",
            json!({"url": "http://127.0.0.1:9/", "type": "webhook.endpoint.disabled"}),
            "event_type",
        ),
        (
            "/v1/schedules",
            json!({"name": "forge", "cron": "* * * * *", "kind": "webhook.deliver", "args": forged}),
            "kind",
        ),
        (
            "/v1/schedules",
            json!({"name": "forge", "cron": "* * * * *", "kind": "demo.echo", "queue": "webhooks"}),
            "queue",
        ),
    ];
    let operate = s.key(Scope::Operate).await;
    for (path, body, field) in cases {
        // Schedules need `operate`; their jobs follow the same rule.
        let key = if path == "/v1/schedules" {
            &operate
        } else {
            &key
        };
        let (status, p) = send(s.req(Method::POST, path, Some(key)).json(&body)).await;
        assert_eq!(status, 422, "{path} {body}: {p}");
        assert_eq!(p["errors"][0]["field"], field, "{path}: {p}");
        assert!(
            p["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("reserved"),
            "{p}"
        );
    }
    let all = t.store.count(&Default::default()).await.unwrap();
    assert_eq!(all, 0, "nothing was enqueued");

    // Other names and types still go through.
    let (status, p) = send(
        s.req(Method::POST, "/v1/events", Some(&key))
            .json(&json!({"type": "invoice.paid", "payload": {}})),
    )
    .await;
    assert_eq!(status, 201, "{p}");
    t.cleanup().await;
}

/// The `Bearer` scheme is case-insensitive (RFC 9110): `BEARER <key>` and `bearer <key>` work.
#[tokio::test]
async fn bearer_scheme_is_case_insensitive() {
    let t = conveyor_tests::TestStore::sqlite().await;
    let s = Server::default(t.store.clone()).await;
    let key = s.key(Scope::Read).await;
    for scheme in ["Bearer", "BEARER", "bearer", "bEaReR"] {
        let (status, p) = send(
            s.req(Method::GET, "/v1/jobs", None)
                .header("Authorization", format!("{scheme} {key}")),
        )
        .await;
        assert_eq!(status, 200, "{scheme}: {p}");
    }
    for bad in [
        format!("Basic {key}"),
        format!("Bearer{key}"),
        "Bearer ".into(),
    ] {
        let (status, p) = send(
            s.req(Method::GET, "/v1/jobs", None)
                .header("Authorization", bad.clone()),
        )
        .await;
        assert_eq!(status, 401, "{bad}: {p}");
    }
    t.cleanup().await;
}

/// A body whose schema is an object is refused as a positional array, which serde would
/// otherwise read field by field.
#[tokio::test]
async fn positional_array_bodies_are_refused() {
    let t = conveyor_tests::TestStore::sqlite().await;
    let s = Server::default(t.store.clone()).await;
    let key = s.key(Scope::Admin).await;
    let cases = [
        ("/v1/jobs", json!(["demo.echo", {"msg": "hi"}])),
        ("/v1/jobs/batch", json!([[{"kind": "demo.echo"}]])),
        ("/v1/events", json!(["invoice.paid", {}])),
        ("/v1/webhooks/endpoints", json!(["http://127.0.0.1:9/"])),
    ];
    for (path, body) in cases {
        let (status, p) = send(s.req(Method::POST, path, Some(&key)).json(&body)).await;
        assert_eq!(status, 422, "{path} {body}: {p}");
        assert_eq!(p["errors"][0]["field"], "body", "{p}");
        assert!(p["detail"].as_str().unwrap().contains("JSON object"), "{p}");
    }
    assert_eq!(t.store.count(&Default::default()).await.unwrap(), 0);
    // Objects, and the usual 415 and 400, are as before.
    let (status, p) = send(
        s.req(Method::POST, "/v1/jobs", Some(&key))
            .json(&json!({"kind": "demo.echo", "args": {"msg": "hi"}})),
    )
    .await;
    assert_eq!(status, 201, "{p}");
    let (status, _) = send(s.req(Method::POST, "/v1/jobs", Some(&key)).body("{}")).await;
    assert_eq!(status, 415);
    let (status, _) = send(
        s.req(Method::POST, "/v1/jobs", Some(&key))
            .header("Content-Type", "application/json; charset=utf-8")
            .body("{bad"),
    )
    .await;
    assert_eq!(status, 400);
    t.cleanup().await;
}
