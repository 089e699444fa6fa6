//! The admin commands, run as a user runs them: the real binary against a real store.

mod common;

use std::sync::Arc;

use common::{Process, conveyor, run, run_json};
use conveyor_tests::eventually;
use conveyor_worker::store::JobFilter;
use conveyor_worker::{JobId, JobState, Store};
use nix::sys::signal::Signal;

cli_backend_tests!(
    enqueue_dedupes_and_dead_letters_can_be_retried_and_purged,
    bad_input_is_explained_and_changes_nothing,
    keys_and_the_audit_log,
);

async fn keys_and_the_audit_log(url: String, store: Arc<dyn Store>) {
    let created = run_json(
        &url,
        &["keys", "create", "--scope", "read", "--name", "dash"],
    );
    let key = created["key"].as_str().unwrap();
    let id = created["id"].as_str().unwrap();
    assert!(key.starts_with(&format!("cvk_{id}_")), "{key}");
    let (code, out, err) = run(
        &url,
        &["keys", "create", "--scope", "operate", "--name", "ops"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.trim().starts_with("cvk_") && err.contains("only time"),
        "{out} {err}"
    );

    let listed = run_json(&url, &["keys", "list"]);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(
        listed.iter().all(|k| k.get("queues").is_none()),
        "{listed:?}"
    );
    assert!(
        listed.iter().all(|k| k.get("hash").is_none()),
        "hashes are never shown"
    );
    assert!(
        !listed.iter().any(|k| k.to_string().contains(&key[21..])),
        "nor secrets"
    );

    let revoked = run_json(&url, &["keys", "revoke", id]);
    assert!(revoked["revoked_at"].is_string());
    let (code, _, err) = run(&url, &["keys", "revoke", "0000000000000000"]);
    assert_eq!(code, 1);
    assert!(err.contains("no key"), "{err}");
    let (code, _, err) = run(&url, &["keys", "create", "--scope", "root", "--name", "x"]);
    assert_eq!(code, 2, "a usage error");
    assert!(
        err.contains("enqueue, read, operate, admin or worker"),
        "{err}"
    );
    // A worker key limited to queues; queues on another scope are bad input.
    let worker = run_json(
        &url,
        &[
            "keys", "create", "--scope", "worker", "--name", "py", "--queue", "emails", "--queue",
            "billing",
        ],
    );
    assert_eq!(worker["scope"], "worker");
    assert_eq!(worker["queues"], serde_json::json!(["billing", "emails"]));
    let (code, _, err) = run(
        &url,
        &[
            "keys", "create", "--scope", "read", "--name", "x", "--queue", "emails",
        ],
    );
    assert_eq!(code, 2, "a usage error: {err}");
    assert!(err.contains("only a `worker` key"), "{err}");
    let (code, _, err) = run(
        &url,
        &[
            "keys",
            "create",
            "--scope",
            "worker",
            "--name",
            "x",
            "--queue",
            "no spaces",
        ],
    );
    assert_eq!(code, 2, "a usage error: {err}");
    assert!(err.contains("queues[0]"), "{err}");

    let job = store
        .enqueue(conveyor_worker::NewJob::new(
            "demo.echo",
            serde_json::json!({}),
        ))
        .await
        .unwrap();
    run_json(&url, &["jobs", "cancel", &job.id.to_string()]);
    let audit = run_json(&url, &["audit", "list"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "job.cancel",
            "key.create",
            "key.revoke",
            "key.create",
            "key.create"
        ]
    );
    assert_eq!(
        audit[1]["target"]["queues"],
        serde_json::json!(["billing", "emails"]),
        "the worker key's queues are audited"
    );
    assert!(
        audit[0]["actor"]["name"]
            .as_str()
            .unwrap()
            .starts_with("cli:")
    );
    assert_eq!(audit[0]["target"]["ids"][0], job.id.to_string());
}

async fn enqueue_dedupes_and_dead_letters_can_be_retried_and_purged(
    url: String,
    store: Arc<dyn Store>,
) {
    let first = run_json(
        &url,
        &[
            "enqueue",
            "--queue",
            "default",
            "--kind",
            "demo.echo",
            "--args",
            r#"{"msg":"hi"}"#,
            "--idempotency-key",
            "k1",
        ],
    );
    assert_eq!(first["duplicate"], false);
    let again = run_json(
        &url,
        &[
            "enqueue",
            "--kind",
            "demo.echo",
            "--args",
            r#"{"msg":"hi"}"#,
            "--idempotency-key",
            "k1",
        ],
    );
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["id"], first["id"]);
    let (code, out, _) = run(
        &url,
        &[
            "enqueue",
            "--kind",
            "demo.echo",
            "--args",
            r#"{"msg":"hi"}"#,
            "--idempotency-key",
            "k1",
        ],
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("duplicate"),
        "the human answer says duplicate: {out}"
    );

    let failing = run_json(
        &url,
        &[
            "enqueue",
            "--kind",
            "demo.fail",
            "--args",
            r#"{"message":"smtp refused"}"#,
            "--max-attempts",
            "1",
            "--tag",
            "mail",
        ],
    );
    let failing_id: JobId = failing["id"].as_str().unwrap().parse().unwrap();
    let delayed = run_json(
        &url,
        &[
            "enqueue",
            "--kind",
            "demo.echo",
            "--args",
            r#"{"msg":"later"}"#,
            "--delay",
            "1h",
        ],
    );
    assert_eq!(delayed["state"], "scheduled");

    let mut worker = Process::spawn({
        let mut c = conveyor(&url, &["worker", "--queues", "default=4"]);
        c.env("CONVEYOR_WORKER__POLL_INTERVAL", "100ms");
        c
    });
    worker.wait_for_line("worker started", 20);

    let s = store.clone();
    eventually(20, "the failing job goes dead", || {
        let s = s.clone();
        async move {
            let job = s.get(failing_id).await.unwrap()?;
            (job.state == JobState::Dead).then_some(())
        }
    })
    .await;

    let dead = run_json(&url, &["dead", "list", "--tag", "mail"]);
    let dead = dead.as_array().unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["id"], failing["id"]);
    let (_, table, _) = run(&url, &["dead", "list"]);
    assert!(
        table.contains("demo.fail") && table.contains(&failing_id.to_string()),
        "{table}"
    );
    assert!(
        !table.contains("next page"),
        "one job fills no page: {table}"
    );
    let (_, full, _) = run(&url, &["dead", "list", "--limit", "1"]);
    assert!(
        full.contains(&format!("next page: --before {failing_id}")),
        "a full page points at the next: {full}"
    );

    let shown = run_json(&url, &["jobs", "show", &failing_id.to_string()]);
    let attempts = shown["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["causes"][0], "smtp refused");
    let (_, human, _) = run(&url, &["jobs", "show", &failing_id.to_string()]);
    assert!(human.contains("caused by: smtp refused"), "{human}");

    // Dry run counts and changes nothing; the real retry runs it again (and it dies again).
    let dry = run_json(&url, &["dead", "retry", "--kind", "demo.fail", "--dry-run"]);
    assert_eq!(dry["matched"], 1);
    assert_eq!(
        store.get(failing_id).await.unwrap().unwrap().state,
        JobState::Dead
    );
    let retried = run_json(&url, &["dead", "retry", "--kind", "demo.fail"]);
    assert_eq!(retried["matched"], 1);
    let s = store.clone();
    eventually(
        20,
        "the retried job runs again and keeps its history",
        || {
            let s = s.clone();
            async move {
                let job = s.get(failing_id).await.unwrap()?;
                (job.state == JobState::Dead && job.attempts.len() == 2).then_some(())
            }
        },
    )
    .await;

    // The echo job completed; the delayed one waits.
    let completed = run_json(&url, &["jobs", "list", "--state", "completed"]);
    assert_eq!(completed.as_array().unwrap().len(), 1);
    let queues = run_json(&url, &["queues"]);
    let default = &queues.as_array().unwrap()[0];
    assert_eq!(default["queue"], "default");
    assert_eq!(default["counts"]["scheduled"], 1);
    assert_eq!(default["counts"]["dead"], 1);

    assert_eq!(worker.stop(Signal::SIGTERM, 30), Some(0), "graceful exit");

    let (code, _, err) = run(&url, &["dead", "purge"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--all"),
        "purge without a filter explains itself: {err}"
    );
    let purged = run_json(&url, &["dead", "purge", "--all"]);
    assert_eq!(purged["matched"], 1);
    assert!(store.get(failing_id).await.unwrap().is_none());

    // Cancel the scheduled job, then discard it.
    let delayed_id = delayed["id"].as_str().unwrap();
    let cancelled = run_json(&url, &["jobs", "cancel", delayed_id]);
    assert_eq!(cancelled[0]["result"], "cancelled");
    let (code, _, err) = run(&url, &["jobs", "cancel", delayed_id]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cancelled"),
        "a second cancel says why not: {err}"
    );
    run_json(&url, &["jobs", "discard", delayed_id]);
    let (code, _, err) = run(&url, &["jobs", "show", delayed_id]);
    assert_eq!(code, 1);
    assert!(err.contains("not found"), "{err}");
}

async fn bad_input_is_explained_and_changes_nothing(url: String, store: Arc<dyn Store>) {
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["enqueue", "--kind", "demo.echo", "--args", "{bad"],
            2,
            "--args is not valid JSON",
        ),
        (
            &["enqueue", "--kind", "bad kind!", "--args", "{}"],
            2,
            "not a valid kind name",
        ),
        (
            &["enqueue", "--kind", "demo.echo", "--run-at", "tomorrow"],
            2,
            "not an RFC 3339 time",
        ),
        (
            &["enqueue", "--kind", "demo.echo", "--delay", "soon"],
            2,
            "not a duration",
        ),
        (
            &["enqueue", "--kind", "demo.echo", "--metadata", "[1]"],
            2,
            "metadata",
        ),
        (
            &["enqueue", "--kind", "demo.echo", "--max-attempts", "0"],
            2,
            "max_attempts",
        ),
        (
            &["jobs", "list", "--state", "deadish"],
            2,
            "unknown state `deadish`",
        ),
        (&["jobs", "list", "--limit", "0"], 2, "limit"),
        (&["jobs", "list", "--since", "last week"], 2, "--since"),
        (&["jobs", "show", "nope"], 2, "is not a job id"),
        (
            &["jobs", "retry", "0193f5a2-7c1e-7b44-9a4e-2f1d3c4b5a69"],
            1,
            "not found",
        ),
        (&["dead", "retry"], 2, "--all"),
        (
            &["serve", "--queues", "default=many"],
            2,
            "not a whole number",
        ),
    ];
    for (args, want_code, want_text) in cases {
        let (code, _, err) = run(&url, args);
        assert_eq!(code, *want_code, "conveyor {args:?}: {err}");
        assert!(
            err.contains(want_text),
            "conveyor {args:?} should say `{want_text}`, said: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(
        store.count(&JobFilter::default()).await.unwrap(),
        0,
        "bad input inserted nothing"
    );

    // Config errors name the key and exit 2.
    let out = tokio::task::block_in_place(|| {
        conveyor(&url, &["queues"])
            .env("CONVEYOR_WORKER__FETCH_BATCH", "lots")
            .output()
            .unwrap()
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("worker.fetch_batch"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_explained() {
    let (code, _, err) = run("postgres://nobody@127.0.0.1:1/none", &["queues"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot open the store at postgres://nobody@127.0.0.1:1/none"),
        "{err}"
    );
    assert!(err.contains("--database-url"), "{err}");

    let (code, _, err) = run("mysql://x/y", &["queues"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown scheme"), "{err}");
}

/// `conveyor enqueue` and `conveyor webhooks send` refuse what only the platform creates
/// (the `webhook.deliver` kind, the `webhooks` queue, `webhook.*` event types), exit 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_kinds_queues_and_event_types_exit_2() {
    let t = conveyor_tests::TestStore::sqlite().await;
    let forged = r#"{"event_id":"evt_x","event_type":"invoice.paid","created_at":"2026-01-01T00:00:00Z","payload":{},"endpoint_id":"ep_x"}"#;
    let cases: &[(&[&str], &str)] = &[
        (
            &["enqueue", "--kind", "webhook.deliver", "--args", forged],
            "kind",
        ),
        (
            &["enqueue", "--kind", "demo.echo", "--queue", "webhooks"],
            "queue",
        ),
        (
            &["webhooks", "send", "--type", "webhook.endpoint.disabled"],
            "event_type",
        ),
        (
            &[
                "schedules",
                "create",
                "--name",
                "forge",
                "--cron",
                "* * * * *",
                "--kind",
                "webhook.deliver",
            ],
            "kind",
        ),
    ];
    for (args, field) in cases {
        let (code, _, err) = run(&t.url, args);
        assert_eq!(code, 2, "conveyor {args:?}: {err}");
        assert!(
            err.contains(&format!("invalid {field}")) && err.contains("reserved"),
            "conveyor {args:?} should name `{field}`: {err}"
        );
    }
    assert_eq!(
        t.store.count(&JobFilter::default()).await.unwrap(),
        0,
        "nothing was enqueued"
    );
    t.cleanup().await;
}
