//! `/v1/backups` over real HTTP on a SQLite store with a real directory destination: a backup,
//! a verification (with a scratch restore) and a prune asked for with an admin key, each
//! queued as a `backup.*` job that a real worker runs, the backups listed and shown, the
//! idempotency key honoured, names checked before anything is queued, every request audited;
//! and the backup kinds refused through `POST /v1/jobs` and client schedules, whatever the
//! key.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{Server, send};
use conveyor_api::ApiConfig;
use conveyor_api::key::Scope;
use conveyor_backup::config::DestinationConfig;
use conveyor_backup::{BackupConfig, Backups};
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::{JobId, JobState, NewJob, Registry, Store};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "conveyor-api-backup-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn backups(url: &str, dir: &std::path::Path) -> Arc<Backups> {
    let mut config = BackupConfig {
        destination: "here".into(),
        ..BackupConfig::default()
    };
    config.destinations.insert(
        "here".into(),
        DestinationConfig::Dir {
            path: dir.to_path_buf(),
        },
    );
    config.retention.keep_last = 1;
    Arc::new(Backups::new(config, url).unwrap())
}

async fn wait_done(store: &Arc<dyn Store>, id: &str) -> conveyor_worker::Job {
    let id: JobId = id.parse().unwrap();
    let store = store.clone();
    conveyor_tests::eventually(30, "the backup job to complete", move || {
        let store = store.clone();
        async move {
            let j = store.get(id).await.unwrap()?;
            assert_ne!(j.state, JobState::Dead, "{:?}", j.attempts);
            (j.state == JobState::Completed).then_some(j)
        }
    })
    .await
}

fn post(s: &Server, path: &str, key: &str, body: Value) -> reqwest::RequestBuilder {
    s.req(Method::POST, path, Some(key)).json(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_over_http_are_jobs_listed_verified_pruned_and_audited() {
    let t = conveyor_tests::TestStore::sqlite().await;
    let jobs = (0..20)
        .map(|i| NewJob::new("noop", json!({ "i": i })).queue("app"))
        .collect();
    t.store.enqueue_many(jobs).await.unwrap();
    let dir = scratch_dir();
    let b = backups(&t.url, &dir);
    let s = Server::start_with(t.store.clone(), ApiConfig::default(), Some(b.clone())).await;
    let admin = s.key(Scope::Admin).await;
    let operate = s.key(Scope::Operate).await;
    let enqueue = s.key(Scope::Enqueue).await;

    // The backup kinds cannot be enqueued or scheduled through the generic routes, whatever
    // the key: only /v1/backups (admin) and the config's schedules start them.
    for key in [&enqueue, &admin] {
        for kind in ["backup.run", "backup.verify", "backup.prune"] {
            let (status, p) = send(post(
                &s,
                "/v1/jobs",
                key,
                json!({ "kind": kind, "args": {} }),
            ))
            .await;
            assert_eq!(status, 422, "{kind}: {p}");
            assert_eq!(p["errors"][0]["field"], "kind", "{p}");
            let detail = p["detail"].as_str().unwrap();
            assert!(detail.contains("POST /v1/backups"), "{detail}");
        }
        let (status, p) = send(post(
            &s,
            "/v1/jobs/batch",
            key,
            json!({ "jobs": [{ "kind": "noop" }, { "kind": "backup.prune" }] }),
        ))
        .await;
        assert_eq!(status, 422, "{p}");
        assert_eq!(p["errors"][0]["field"], "jobs[1].kind", "{p}");
    }
    let (status, p) = send(post(
        &s,
        "/v1/schedules",
        &operate,
        json!({ "name": "sneaky", "cron": "* * * * *", "kind": "backup.run" }),
    ))
    .await;
    assert_eq!(
        (status, &p["errors"][0]["field"]),
        (422, &json!("kind")),
        "{p}"
    );

    // Admin scope only.
    for key in [&enqueue, &operate] {
        let (status, _) = send(post(&s, "/v1/backups", key, json!({}))).await;
        assert_eq!(status, 403);
        let (status, _) = send(s.req(Method::GET, "/v1/backups", Some(key))).await;
        assert_eq!(status, 403);
    }

    // Names are checked before anything is queued.
    for (body, field, says) in [
        (
            json!({ "source": "nope" }),
            "source",
            "no backup source `nope`",
        ),
        (
            json!({ "destination": "nope" }),
            "destination",
            "no backup destination `nope`",
        ),
        (json!({ "queue": "webhooks" }), "queue", "reserved"),
    ] {
        let (status, p) = send(post(&s, "/v1/backups", &admin, body)).await;
        assert_eq!(status, 422, "{p}");
        assert_eq!(p["errors"][0]["field"], field, "{p}");
        assert!(p["detail"].as_str().unwrap().contains(says), "{p}");
    }
    let (status, p) = send(s.req(Method::GET, "/v1/backups?destination=nope", Some(&admin))).await;
    assert_eq!(
        (status, &p["errors"][0]["field"]),
        (422, &json!("destination")),
        "{p}"
    );
    let queued = t
        .store
        .count(&conveyor_worker::store::JobFilter::default())
        .await
        .unwrap();
    assert_eq!(queued, 20, "nothing queued by refused requests");

    // Queued: 202, the job named; the same idempotency key answers with the same job.
    let first = post(&s, "/v1/backups", &admin, json!({ "queue": "maint" }))
        .header("Idempotency-Key", "nightly-1")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 202);
    let location = first.headers()["location"].to_str().unwrap().to_string();
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["kind"], "backup.run");
    assert_eq!(
        location,
        format!("/v1/jobs/{}", first["job_id"].as_str().unwrap())
    );
    let again = post(&s, "/v1/backups", &admin, json!({ "queue": "maint" }))
        .header("Idempotency-Key", "nightly-1")
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(
        (again["job_id"].clone(), again["duplicate"].clone()),
        (first["job_id"].clone(), json!(true))
    );
    // No worker serves `maint` yet: the answer says so.
    assert!(
        first["warnings"].as_array().is_some_and(|w| !w.is_empty()),
        "{first}"
    );

    // A real worker runs the jobs.
    let mut registry = Registry::new();
    conveyor_jobs::backup::register(&mut registry, b.clone());
    let worker = Worker::new(
        t.store.clone(),
        registry,
        WorkerConfig {
            queues: vec![QueueConfig {
                name: "maint".into(),
                concurrency: 1,
            }],
            poll_interval: Duration::from_millis(100),
            ..WorkerConfig::default()
        },
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(worker.run(shutdown.clone()));
    let done = wait_done(&t.store, first["job_id"].as_str().unwrap()).await;
    let backup_id = done.result.unwrap()["id"].as_str().unwrap().to_string();

    let (status, list) = send(s.req(Method::GET, "/v1/backups", Some(&admin))).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["id"], backup_id.as_str());
    assert_eq!(list[0]["source"], "store");
    assert_eq!(list[0]["source_kind"], "sqlite");
    assert!(list[0]["stored_bytes"].as_u64().unwrap() > 0, "{list}");
    let (_, only) = send(s.req(
        Method::GET,
        "/v1/backups?source=store&destination=here",
        Some(&admin),
    ))
    .await;
    assert_eq!(only, list);
    let (_, none) = send(s.req(Method::GET, "/v1/backups?source=other", Some(&admin))).await;
    assert_eq!(none, json!([]));
    let (status, shown) = send(s.req(
        Method::GET,
        &format!("/v1/backups/{backup_id}"),
        Some(&admin),
    ))
    .await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["id"], backup_id.as_str());
    assert_eq!(shown["objects"][0]["name"], "data.zst", "{shown}");
    for missing in ["20990101T000000.000Z-00000000", "not-an-id"] {
        let (status, p) =
            send(s.req(Method::GET, &format!("/v1/backups/{missing}"), Some(&admin))).await;
        assert_eq!(status, 404, "{p}");
    }

    // Verify with a scratch restore: a job whose result says what was compared.
    let (status, p) = send(post(
        &s,
        "/v1/backups/20990101T000000.000Z-00000000/verify",
        &admin,
        json!({}),
    ))
    .await;
    assert_eq!(status, 404, "{p}");
    let (status, verify) = send(post(
        &s,
        &format!("/v1/backups/{backup_id}/verify"),
        &admin,
        json!({ "restore": true, "queue": "maint" }),
    ))
    .await;
    assert_eq!(
        (status, &verify["kind"]),
        (202, &json!("backup.verify")),
        "{verify}"
    );
    let result = wait_done(&t.store, verify["job_id"].as_str().unwrap())
        .await
        .result
        .unwrap();
    assert_eq!(
        (result["id"].as_str(), result["restored"].as_bool()),
        (Some(backup_id.as_str()), Some(true)),
        "{result}"
    );
    assert!(result["tables"].as_u64().unwrap() > 0, "{result}");

    // A second backup, then prune (keep_last = 1, the newest verified kept too).
    let (_, second) = send(post(&s, "/v1/backups", &admin, json!({ "queue": "maint" }))).await;
    let second_id = wait_done(&t.store, second["job_id"].as_str().unwrap())
        .await
        .result
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, prune) = send(post(
        &s,
        "/v1/backups/prune",
        &admin,
        json!({ "dry_run": true, "queue": "maint" }),
    ))
    .await;
    assert_eq!(
        (status, &prune["kind"]),
        (202, &json!("backup.prune")),
        "{prune}"
    );
    let result = wait_done(&t.store, prune["job_id"].as_str().unwrap())
        .await
        .result
        .unwrap();
    assert_eq!(result["dry_run"], true, "{result}");
    let kept: Vec<&str> = result["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(kept, [backup_id.as_str(), second_id.as_str()], "{result}");

    shutdown.cancel();
    handle.await.unwrap().unwrap();

    // Every request that queued something is audited once (the replayed one is not), by
    // the admin key, naming the job.
    let (_, page) = send(s.req(Method::GET, "/v1/audit", Some(&admin))).await;
    let backup_entries: Vec<&Value> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"].as_str().unwrap().starts_with("backup."))
        .collect();
    let actions: Vec<&str> = backup_entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "backup.prune",
            "backup.create",
            "backup.verify",
            "backup.create"
        ],
        "{page}"
    );
    for e in &backup_entries {
        assert_eq!(e["actor"]["name"], "test-admin", "{e}");
        assert!(e["target"]["job"].is_string(), "{e}");
    }
    assert_eq!(backup_entries[3]["target"]["job"], first["job_id"]);
    assert_eq!(
        backup_entries[3]["target"],
        json!({ "source": "store", "destination": "here", "job": first["job_id"] })
    );
    assert_eq!(backup_entries[2]["target"]["restore"], true);

    drop(s);
    t.cleanup().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server started without backup settings answers the backup routes with a problem that
/// says so, not a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_backup_settings_the_routes_say_so() {
    let t = conveyor_tests::TestStore::sqlite().await;
    let s = Server::default(t.store.clone()).await;
    let admin = s.key(Scope::Admin).await;
    let (status, p) = send(s.req(Method::GET, "/v1/backups", Some(&admin))).await;
    assert_eq!(status, 409, "{p}");
    assert!(
        p["detail"].as_str().unwrap().contains("backup settings"),
        "{p}"
    );
    let (status, _) = send(post(&s, "/v1/backups", &admin, json!({}))).await;
    assert_eq!(status, 409);
    drop(s);
    t.cleanup().await;
}
