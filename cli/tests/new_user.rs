//! What a new user trips over: a mistyped environment variable, a command without `--json`,
//! job arguments too large for the command line.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use common::{run, run_json};
use conveyor_worker::Store;

cli_backend_tests!(
    every_command_answers_json,
    args_come_from_a_file_or_stdin,
    bad_input_exits_2,
);

/// An empty working directory of its own, so a stray `./conveyor.db` would show.
fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("conveyor-newuser-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `conveyor` in `dir` with no `--database-url` and no inherited `CONVEYOR_*` variables.
fn bare(dir: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_conveyor"));
    cmd.args(args).current_dir(dir).env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("CONVEYOR_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[test]
fn a_mistyped_environment_variable_stops_the_process() {
    let dir = scratch_dir();
    for (name, meant) in [
        ("CONVEYOR_DATABSE__URL", Some("CONVEYOR_DATABASE__URL")),
        ("CONVEYOR_DATABASE_URL", Some("CONVEYOR_DATABASE__URL")),
        ("CONVEYOR_DATABASE__URLL", Some("CONVEYOR_DATABASE__URL")),
        ("CONVEYOR_WORKER__NO_SUCH_THING", None),
    ] {
        let out = bare(&dir, &["queues"])
            .env(name, "postgres://postgres@127.0.0.1:1/conveyor")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(name), "{name}: {err}");
        if let Some(meant) = meant {
            assert!(err.contains(&format!("did you mean {meant}?")), "{err}");
        }
        assert!(!err.contains(".rs"), "no source locations: {err}");
        assert!(
            !dir.join("conveyor.db").exists(),
            "{name}: no fresh ./conveyor.db"
        );
    }

    // A bad value names the variable it came from, not our code.
    let out = bare(&dir, &["queues"])
        .env("CONVEYOR_WORKER__FETCH_BATCH", "lots")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("CONVEYOR_WORKER__FETCH_BATCH"), "{err}");
    assert!(!err.contains(".rs"), "no source locations: {err}");

    // Variables that are not config are left alone: the tools' own, and those Kubernetes sets
    // for a service named `conveyor`.
    let out = bare(&dir, &["queues", "--json"])
        .env("CONVEYOR_BIN", "/usr/local/bin/conveyor")
        .env("CONVEYOR_TEST_PG_URL", "postgres://x")
        .env("CONVEYOR_SERVICE_HOST", "10.0.0.1")
        .env("CONVEYOR_API_KEY", "cvk_for_a_client")
        .env("CONVEYOR_PORT_8080_TCP", "tcp://10.0.0.1:8080")
        .env("CONVEYOR_DATABASE__URL", "sqlite://ok.db")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The commands that printed only text before: each prints the affected record as JSON.
async fn every_command_answers_json(url: String, _store: Arc<dyn Store>) {
    let migrated = run_json(&url, &["migrate"]);
    assert_eq!(migrated["migrated"], true, "{migrated}");
    assert!(migrated["backend"].is_string(), "{migrated}");

    run_json(
        &url,
        &[
            "schedules",
            "create",
            "--name",
            "digest",
            "--cron",
            "0 8 * * *",
            "--kind",
            "noop",
        ],
    );
    let paused = run_json(&url, &["schedules", "pause", "digest"]);
    assert_eq!(paused["spec"]["enabled"], false, "{paused}");
    let resumed = run_json(&url, &["schedules", "resume", "digest"]);
    assert_eq!(resumed["spec"]["enabled"], true, "{resumed}");
    assert!(resumed["next_fire"].is_string(), "{resumed}");
    let deleted = run_json(&url, &["schedules", "delete", "digest"]);
    assert_eq!(deleted["deleted"]["spec"]["name"], "digest", "{deleted}");

    let ep = run_json(
        &url,
        &[
            "webhooks",
            "endpoints",
            "create",
            "--url",
            "https://hooks.example.com/in",
            "--disabled",
        ],
    );
    let id = ep["id"].as_str().unwrap();
    let secret = ep["secrets"][0]["secret"].as_str().unwrap();
    let enabled = run_json(&url, &["webhooks", "endpoints", "enable", id]);
    assert_eq!(enabled["enabled"], true, "{enabled}");
    assert!(
        !enabled.to_string().contains(secret),
        "secrets stay hidden: {enabled}"
    );
    let disabled = run_json(&url, &["webhooks", "endpoints", "disable", id]);
    assert_eq!(disabled["enabled"], false, "{disabled}");
    let deleted = run_json(&url, &["webhooks", "endpoints", "delete", id]);
    assert_eq!(deleted["deleted"], id, "{deleted}");
    let (code, _, _) = run(&url, &["webhooks", "endpoints", "show", id]);
    assert_ne!(code, 0, "the endpoint is gone");
}

/// `--args @file.json` and `@-` (stdin) wherever a command takes JSON; a missing file or bad
/// JSON is a usage error (exit 2) naming the file.
async fn args_come_from_a_file_or_stdin(url: String, store: Arc<dyn Store>) {
    let dir = scratch_dir();
    let big: String = "x".repeat(200_000);
    let file = dir.join("args.json");
    std::fs::write(&file, serde_json::json!({ "blob": big }).to_string()).unwrap();
    let at_file = format!("@{}", file.display());

    let job = run_json(&url, &["enqueue", "--kind", "noop", "--args", &at_file]);
    let id: conveyor_worker::JobId = job["id"].as_str().unwrap().parse().unwrap();
    let stored = store.get(id).await.unwrap().unwrap();
    assert_eq!(stored.args["blob"].as_str().map(str::len), Some(200_000));

    let mut child = common::conveyor(
        &url,
        &["enqueue", "--kind", "noop", "--args", "@-", "--json"],
    )
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(br#"{"from":"stdin"}"#)
            .unwrap();
    }
    let out = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
    assert!(out.status.success());
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id: conveyor_worker::JobId = job["id"].as_str().unwrap().parse().unwrap();
    let stored = store.get(id).await.unwrap().unwrap();
    assert_eq!(stored.args["from"], "stdin");

    let created = run_json(
        &url,
        &[
            "schedules",
            "create",
            "--name",
            "big",
            "--cron",
            "0 8 * * *",
            "--kind",
            "noop",
            "--args",
            &at_file,
        ],
    );
    assert_eq!(
        created["spec"]["args"]["blob"].as_str().map(str::len),
        Some(200_000)
    );

    let missing = dir.join("missing.json");
    let bad = dir.join("bad.json");
    std::fs::write(&bad, "{not json").unwrap();
    for path in [&missing, &bad] {
        let arg = format!("@{}", path.display());
        for cmd in [
            vec!["enqueue", "--kind", "noop", "--args", &arg],
            vec!["schedules", "update", "big", "--args", &arg],
            vec!["webhooks", "send", "--type", "t.x", "--payload", &arg],
        ] {
            let (code, _, err) = run(&url, &cmd);
            assert_eq!(code, 2, "{cmd:?}: {err}");
            assert!(err.contains(&path.display().to_string()), "{cmd:?}: {err}");
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Usage and validation errors exit 2 (as clap's do), an operation that failed exits 1.
async fn bad_input_exits_2(url: String, _store: Arc<dyn Store>) {
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &[
                "webhooks",
                "endpoints",
                "create",
                "--url",
                "https://h.example.com",
                "--timeout",
                "soon",
            ],
            2,
            "not a duration",
        ),
        (
            &[
                "webhooks",
                "endpoints",
                "create",
                "--url",
                "https://h.example.com",
                "--header",
                "x",
            ],
            2,
            "NAME=VALUE",
        ),
        (&["webhooks", "attempts"], 2, "--endpoint"),
        (&["webhooks", "replay"], 2, "--delivery"),
        (&["schedules", "create", "--name", "x"], 2, "--cron"),
        (
            &[
                "schedules",
                "create",
                "--name",
                "x",
                "--cron",
                "nope",
                "--kind",
                "k",
            ],
            2,
            "cron",
        ),
        (&["jobs", "list", "--until", "someday"], 2, "--until"),
        (&["dead", "purge"], 2, "--all"),
        (
            &["webhooks", "endpoints", "show", "ep_nope"],
            1,
            "not found",
        ),
    ];
    for (args, want_code, want_text) in cases {
        let (code, _, err) = run(&url, args);
        assert_eq!(code, *want_code, "conveyor {args:?}: {err}");
        assert!(err.contains(want_text), "conveyor {args:?}: {err}");
    }
}

/// A store that cannot be opened is reported with its root cause, once, at once: no pool
/// timeout in its place, no cause repeated by every layer, no line number of the server's
/// own source code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_opened_is_reported_by_its_root_cause_once() {
    let admin = conveyor_tests::pg_admin_url();
    if let Err(e) = sqlx::PgPool::connect(&admin).await {
        return conveyor_tests::unavailable::<()>(&format!(
            "Postgres at {admin} is unreachable ({e}); set CONVEYOR_TEST_PG_URL or start Postgres"
        ))
        .unwrap_or(());
    }
    let missing = format!("conveyor_missing_{}", uuid::Uuid::now_v7().simple());
    let (code, _, err) = run(&conveyor_tests::replace_db(&admin, &missing), &["queues"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.matches("does not exist").count(), 1, "{err}");
    assert!(err.contains("createdb"), "{err}");
    assert!(err.contains(&missing), "{err}");
    assert!(!err.contains("at line"), "{err}");

    // Nothing listens on port 1: the refusal itself, not a pool that timed out.
    for url in [
        "postgres://postgres@127.0.0.1:1/conveyor",
        "redis://127.0.0.1:1/0",
    ] {
        let (code, _, err) = run(url, &["queues"]);
        assert_eq!(code, 1, "{err}");
        assert_eq!(err.matches("Connection refused").count(), 1, "{url}: {err}");
        assert!(!err.contains("timed out"), "{url}: {err}");
        assert!(
            err.contains("--database-url"),
            "{url}: says how to fix: {err}"
        );
    }

    // A SQLite file in a folder that does not exist names the folder.
    let dir = scratch_dir().join("no").join("such");
    let (code, _, err) = run(
        &format!("sqlite://{}", dir.join("conveyor.db").display()),
        &["queues"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&dir.display().to_string()), "{err}");
    assert!(err.contains("does not exist"), "{err}");
}

/// `jobs list` shows a failure's root cause beside its message: the message alone
/// ("sending attempt 3") rarely says what to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_list_shows_the_root_cause_of_the_last_error() {
    use conveyor_worker::store::{FetchRequest, Finish};
    use conveyor_worker::{AttemptOutcome, AttemptRecord, JobState, NewJob};

    let t = conveyor_tests::TestStore::sqlite().await;
    let e = t
        .store
        .enqueue(NewJob::new("report.send", serde_json::json!({})).queue("reports"))
        .await
        .unwrap();
    let job = t
        .store
        .fetch(FetchRequest {
            queue: "reports",
            limit: 1,
            worker: "w1",
            lease: std::time::Duration::from_secs(30),
        })
        .await
        .unwrap()
        .remove(0);
    assert_eq!(job.id, e.id);
    let now = chrono::Utc::now();
    t.store
        .finish(vec![Finish {
            id: job.id,
            attempt: job.attempt,
            state: JobState::Dead,
            run_at: None,
            attempt_delta: 0,
            record: AttemptRecord {
                attempt: job.attempt,
                started_at: now,
                finished_at: now,
                worker: Some("w1".into()),
                outcome: AttemptOutcome::Failed,
                error: Some("sending attempt 1".into()),
                causes: vec![
                    "talking to smtp.example.com".into(),
                    "connection refused".into(),
                ],
                duration_ms: 3,
                traceback: None,
            },
            result: None,
        }])
        .await
        .unwrap();
    let (code, out, err) = run(&t.url, &["jobs", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sending attempt 1"), "{out}");
    assert!(out.contains("connection refused"), "the root cause: {out}");
    t.cleanup().await;
}
