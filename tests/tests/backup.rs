//! Backups of the store on SQLite and Postgres into a real directory destination: created
//! while the store is in use, listed only once complete, verified by re-reading every
//! checksum; a damaged object is named by `verify`; a dump that fails leaves no backup.
//! Restores into a fresh store on which a worker carries on; `verify --restore`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_backup::config::DestinationConfig;
use conveyor_backup::manifest::SourceKind;
use conveyor_backup::{BackupConfig, Backups, DATA_OBJECT, Error};
use conveyor_tests::TestStore;
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::store::FetchRequest;
use conveyor_worker::{
    AttemptOutcome, JobContext, JobId, JobState, NewJob, Outcome, Registry, Store, StoreOptions,
};
use serde_json::json;
use sha2::Digest;
use tokio_util::sync::CancellationToken;

fn backups(url: &str, dir: &Path) -> Backups {
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
    Backups::new(config, url).expect("a valid config")
}

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "conveyor-backup-test-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn fill(t: &TestStore, n: usize) {
    let jobs = (0..n)
        .map(|i| NewJob::new("noop", json!({ "i": i, "pad": "x".repeat(200) })))
        .collect();
    t.store.enqueue_many(jobs).await.expect("enqueue");
}

fn jobs_rows(m: &conveyor_backup::Manifest) -> u64 {
    m.tables
        .iter()
        .find(|t| t.table == "jobs" || t.table == "conveyor.jobs")
        .unwrap_or_else(|| panic!("no jobs table in {:?}", m.tables))
        .rows
}

async fn create_list_verify_and_detect_damage(t: TestStore, kind: SourceKind) {
    fill(&t, 500).await;
    let dir = scratch_dir();
    let b = backups(&t.url, &dir);
    assert!(
        b.destination(None)
            .unwrap()
            .list(None)
            .await
            .unwrap()
            .is_empty()
    );

    let first = b.create("store", None).await.expect("backup");
    assert_eq!(first.source, "store");
    assert_eq!(first.source_kind, kind);
    assert_eq!(jobs_rows(&first), 500, "{:?}", first.tables);
    assert!(first.raw_bytes() > 0 && first.stored_bytes() > 0);
    if kind == SourceKind::PostgresCustom {
        assert!(
            first.tables.iter().all(|t| t.checksum.is_some()),
            "{:?}",
            first.tables
        );
    }

    // The store carries on; a second backup sees what was added.
    fill(&t, 100).await;
    let second = b.create("store", None).await.expect("backup");
    assert_eq!(jobs_rows(&second), 600);

    let listed = b
        .destination(None)
        .unwrap()
        .list(Some("store"))
        .await
        .unwrap();
    let ids: Vec<&str> = listed.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, [first.id.as_str(), second.id.as_str()], "oldest first");
    assert_eq!(
        b.destination(None).unwrap().find(&first.id).await.unwrap(),
        first
    );

    let verified = b.verify(&first.id, None).await.expect("verifies");
    assert_eq!(verified.objects, 1);
    assert_eq!(verified.raw_bytes, first.raw_bytes());

    // One flipped byte in the stored object: verify names the object and the backup.
    let object = dir.join("store").join(&first.id).join(DATA_OBJECT);
    let mut bytes = std::fs::read(&object).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&object, bytes).unwrap();
    match b.verify(&first.id, None).await {
        Err(Error::Damaged { backup, message }) => {
            assert_eq!(backup, first.id);
            assert!(message.contains(DATA_OBJECT), "{message}");
        }
        other => panic!("a damaged backup verified: {other:?}"),
    }
    // The other backup is untouched.
    b.verify(&second.id, None)
        .await
        .expect("the second still verifies");

    // Unknown ids are refused with what ids look like.
    let err = b.verify("nope", None).await.unwrap_err().to_string();
    assert!(err.contains("not a backup id"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

mod sqlite {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn create_list_verify_and_detect_damage() {
        let t = TestStore::sqlite().await;
        super::create_list_verify_and_detect_damage(t, SourceKind::Sqlite).await;
    }
}

mod postgres {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn create_list_verify_and_detect_damage() {
        let Some(t) = TestStore::postgres().await else {
            return;
        };
        super::create_list_verify_and_detect_damage(t, SourceKind::PostgresCustom).await;
    }

    /// `pg_dump` failing (here: a binary that exits 1 after writing part of a dump) fails the
    /// backup with its message, and nothing is listed: without a manifest there is no backup.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_dump_leaves_no_backup() {
        let Some(t) = TestStore::postgres().await else {
            return;
        };
        fill(&t, 10).await;
        let dir = scratch_dir();
        let fake = dir.join("pg_dump");
        std::fs::write(
            &fake,
            "#!/bin/sh\nprintf 'PGDMP partial'\necho 'pg_dump: error: connection lost' >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let dest = dir.join("backups");
        let mut b = backups(&t.url, &dest);
        b = {
            let mut config = b.config().clone();
            config.pg_dump = fake.clone();
            Backups::new(config, &t.url).unwrap()
        };
        let err = b.create("store", None).await.unwrap_err().to_string();
        assert!(err.contains("connection lost"), "{err}");
        assert!(
            b.destination(None)
                .unwrap()
                .list(None)
                .await
                .unwrap()
                .is_empty()
        );
        // Not even a part of the object is left behind.
        let mut left = Vec::new();
        let mut dirs = vec![dest.clone()];
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    left.push(path);
                }
            }
        }
        assert!(left.is_empty(), "left behind: {left:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// moto's S3-compatible server (`.venv/bin/moto_server`, installed by `scripts/test-deps.sh`)
/// on a free port, killed when dropped.
struct S3Server {
    child: std::process::Child,
    endpoint: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn s3_server() -> Option<S3Server> {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server");
    if !bin.exists() {
        return conveyor_tests::unavailable(&format!(
            "{} is missing: run `bash scripts/test-deps.sh`",
            bin.display()
        ));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let child = std::process::Command::new(&bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("moto_server starts");
    let server = S3Server {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    };
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Some(server);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("moto_server did not listen on {port} within 10 s");
}

fn s3_backups(url: &str, endpoint: &str, bucket: &str) -> Backups {
    let mut config = BackupConfig {
        destination: "s3".into(),
        part_size_mib: 5,
        ..BackupConfig::default()
    };
    config.destinations.insert(
        "s3".into(),
        DestinationConfig::S3 {
            bucket: bucket.into(),
            prefix: "conveyor/test".into(),
            region: Some("us-east-1".into()),
            endpoint: Some(endpoint.into()),
            access_key_id: Some("test".into()),
            secret_access_key: Some(conveyor_backup::config::Secret("test".into())),
            allow_http: true,
        },
    );
    Backups::new(config, url).expect("a valid config")
}

/// A backup larger than one part goes to S3 in several parts and verifies; an object changed
/// in the bucket is named by `verify`; a bucket that does not exist and an endpoint nobody
/// listens on fail the backup with the destination named, and list nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_compatible_destination() {
    let Some(s3) = s3_server().await else {
        return;
    };
    let http = reqwest::Client::new();
    let made = http
        .put(format!("{}/backups", s3.endpoint))
        .send()
        .await
        .unwrap();
    assert!(made.status().is_success(), "creating the bucket: {made:?}");

    let t = TestStore::sqlite().await;
    // Rows of hex digests (about 2:1 under zstd): more than one 5 MiB part once compressed.
    for round in 0..6 {
        let jobs = (0..1000)
            .map(|i| {
                let noise: String = (0..32)
                    .map(|j| {
                        let digest = sha2::Sha256::digest(format!("{round}-{i}-{j}").as_bytes());
                        digest
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<String>()
                    })
                    .collect();
                NewJob::new("noop", json!({ "noise": noise }))
            })
            .collect();
        t.store.enqueue_many(jobs).await.unwrap();
    }
    let b = s3_backups(&t.url, &s3.endpoint, "backups");
    let m = b.create("store", None).await.expect("backup to S3");
    assert!(
        m.stored_bytes() > 5 * 1024 * 1024,
        "{} stored bytes: not more than one part",
        m.stored_bytes()
    );
    assert_eq!(jobs_rows(&m), 6000);
    let listed = b.destination(None).unwrap().list(None).await.unwrap();
    assert_eq!(listed, std::slice::from_ref(&m));
    b.verify(&m.id, None).await.expect("verifies");

    // Replace the object in the bucket with other bytes of the same length.
    let key = format!(
        "{}/backups/conveyor/test/store/{}/{DATA_OBJECT}",
        s3.endpoint, m.id
    );
    let mut bytes = http
        .get(&key)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    assert_eq!(bytes.len() as u64, m.stored_bytes());
    bytes[100] ^= 1;
    assert!(
        http.put(&key)
            .body(bytes)
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    let err = b.verify(&m.id, None).await.unwrap_err().to_string();
    assert!(err.contains(&m.id) && err.contains(DATA_OBJECT), "{err}");

    // No such bucket: refused, destination named, nothing listed anywhere.
    let missing = s3_backups(&t.url, &s3.endpoint, "nobucket");
    let err = missing.create("store", None).await.unwrap_err().to_string();
    assert!(err.contains("destination `s3`"), "{err}");

    // Nobody listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let unreachable = s3_backups(&t.url, &dead, "backups");
    let err = unreachable
        .create("store", None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("destination `s3`"), "{err}");
    assert_eq!(b.destination(None).unwrap().list(None).await.unwrap(), [m]);
}

/// A fresh, empty Postgres database (not migrated), dropped with the returned guard.
async fn empty_postgres_database() -> Option<(String, conveyor_tests::Cleanup)> {
    use sqlx::Connection;
    let admin_url = conveyor_tests::pg_admin_url();
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.ok()?;
    let name = format!("conveyor_t_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("the test role may create databases");
    let _ = admin.close().await;
    let url = conveyor_tests::replace_db(&admin_url, &name);
    Some((url, conveyor_tests::Cleanup::Database { admin_url, name }))
}

/// A worker running kind `count` on queues `default` and `first`, counting how often each
/// job ran.
struct CountingWorker {
    runs: Arc<Mutex<HashMap<JobId, usize>>>,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<conveyor_worker::Result<()>>,
}

impl CountingWorker {
    fn start(store: &Arc<dyn Store>) -> Self {
        let runs: Arc<Mutex<HashMap<JobId, usize>>> = Arc::default();
        let mut registry = Registry::new();
        let counted = runs.clone();
        registry.register("count", move |_: serde_json::Value, ctx: JobContext| {
            let counted = counted.clone();
            async move {
                *counted.lock().unwrap().entry(ctx.job.id).or_default() += 1;
                Ok(Outcome::Done)
            }
        });
        let config = WorkerConfig {
            queues: ["default", "first"]
                .into_iter()
                .map(|name| QueueConfig {
                    name: name.into(),
                    concurrency: 4,
                })
                .collect(),
            poll_interval: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(5),
            ..WorkerConfig::default()
        };
        let worker = Worker::new(store.clone(), registry, config).expect("valid config");
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        Self {
            runs,
            shutdown,
            handle,
        }
    }

    async fn stop(self) -> HashMap<JobId, usize> {
        self.shutdown.cancel();
        self.handle
            .await
            .unwrap()
            .expect("worker shut down cleanly");
        Arc::try_unwrap(self.runs).unwrap().into_inner().unwrap()
    }
}

async fn completed(store: &Arc<dyn Store>, ids: &[JobId]) -> usize {
    let mut n = 0;
    for id in ids {
        if store.get(*id).await.unwrap().unwrap().state == JobState::Completed {
            n += 1;
        }
    }
    n
}

/// Jobs in every live state, backed up, restored into a fresh store: a worker started on the
/// restored store completes every job that was not complete at backup time exactly once
/// (the running ones after the lease rescue), and none that was. Before that: a target that
/// holds data, and a target of the other kind, are refused; a damaged object makes restore
/// refuse and leaves the target untouched; `verify --restore` matches, and names a table
/// whose recorded figures differ.
async fn restore_carries_on(t: TestStore, fresh_target: String) {
    let s = t.store.clone();
    // Completed before the backup.
    let mut done = Vec::new();
    for i in 0..3 {
        done.push(
            s.enqueue(NewJob::new("count", json!({ "done": i })).queue("first"))
                .await
                .unwrap()
                .id,
        );
    }
    let w = CountingWorker::start(&s);
    conveyor_tests::eventually(20, "the first jobs to complete", || {
        let s = s.clone();
        let done = done.clone();
        async move { (completed(&s, &done).await == 3).then_some(()) }
    })
    .await;
    let first_runs = w.stop().await;
    assert_eq!(first_runs.len(), 3);
    // Running (leased for 1 s by a worker that then disappears), available, scheduled.
    let mut open = Vec::new();
    for i in 0..5 {
        open.push(
            s.enqueue(NewJob::new("count", json!({ "running": i })))
                .await
                .unwrap()
                .id,
        );
    }
    let claimed = s
        .fetch(FetchRequest {
            queue: "default",
            limit: 5,
            worker: "gone-worker",
            lease: Duration::from_secs(1),
        })
        .await
        .unwrap();
    assert_eq!(claimed.len(), 5);
    for i in 0..10 {
        open.push(
            s.enqueue(NewJob::new("count", json!({ "available": i })))
                .await
                .unwrap()
                .id,
        );
    }
    for i in 0..2 {
        open.push(
            s.enqueue(
                NewJob::new("count", json!({ "scheduled": i }))
                    .run_at(chrono::Utc::now() + chrono::Duration::seconds(2)),
            )
            .await
            .unwrap()
            .id,
        );
    }

    let dir = scratch_dir();
    let b = backups(&t.url, &dir);
    let m = b.create("store", None).await.expect("backup");

    // The source store itself holds data: refused, whatever the kind.
    let err = b.restore(&m.id, &t.url, false, None).await.unwrap_err();
    assert!(matches!(err, Error::Refused(_)), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    // The other kind of target: refused before anything is read.
    let other = if fresh_target.starts_with("postgres") {
        dir.join("other.db").display().to_string()
    } else {
        "postgres://127.0.0.1:1/nothing".to_string()
    };
    let err = b.restore(&m.id, &other, false, None).await.unwrap_err();
    assert!(matches!(err, Error::Refused(_)), "{err}");

    // verify --restore matches; with a recorded figure changed, the table is named.
    let checked = b
        .verify_restore(&m.id, None)
        .await
        .expect("verify --restore");
    assert_eq!(checked.tables.len(), m.tables.len());
    let manifest_path = dir.join("store").join(&m.id).join("manifest.json");
    let original_manifest = std::fs::read(&manifest_path).unwrap();
    let mut edited = m.clone();
    let jobs_table = edited
        .tables
        .iter_mut()
        .find(|t| t.table == "jobs" || t.table == "conveyor.jobs")
        .unwrap();
    jobs_table.rows += 1;
    let jobs_table = jobs_table.table.clone();
    std::fs::write(&manifest_path, serde_json::to_vec(&edited).unwrap()).unwrap();
    match b.verify_restore(&m.id, None).await {
        Err(Error::Mismatch { backup, message }) => {
            assert_eq!(backup, m.id);
            assert!(
                message.contains(&jobs_table)
                    && message.contains("has 20 rows, the backup recorded 21"),
                "{message}"
            );
        }
        other => panic!("a changed figure was not noticed: {other:?}"),
    }
    std::fs::write(&manifest_path, &original_manifest).unwrap();

    // A damaged object: restore refuses naming it, and the target is not written.
    let object = dir.join("store").join(&m.id).join(DATA_OBJECT);
    let good = std::fs::read(&object).unwrap();
    let mut bad = good.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0x55;
    std::fs::write(&object, &bad).unwrap();
    match b.restore(&m.id, &fresh_target, false, None).await {
        Err(Error::Damaged { backup, message }) => {
            assert_eq!(backup, m.id);
            assert!(message.contains(DATA_OBJECT), "{message}");
        }
        other => panic!("a damaged backup was restored: {other:?}"),
    }
    if !fresh_target.starts_with("postgres") {
        assert!(!Path::new(&fresh_target).exists(), "the target was written");
    }
    std::fs::write(&object, &good).unwrap();

    // The leases taken before the backup have expired by now.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let restored = b
        .restore(&m.id, &fresh_target, false, None)
        .await
        .expect("restore");
    assert_eq!(restored.tables, m.tables);
    let jobs = restored.jobs.expect("a store's jobs are reported");
    assert_eq!(
        (jobs.retried, jobs.dead, jobs.cancelled, jobs.still_leased),
        (5, 0, 0, 0),
        "{jobs:?}"
    );
    // Restoring again over the restored store needs --force.
    let err = b
        .restore(&m.id, &fresh_target, false, None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Refused(_)), "{err}");

    let target_url = fresh_target
        .parse::<conveyor_backup::Target>()
        .unwrap()
        .store_url();
    let r = conveyor_worker::store::connect(&target_url, StoreOptions::default())
        .await
        .expect("the restored store opens");
    for id in &claimed {
        let j = r.get(id.id).await.unwrap().unwrap();
        assert_eq!(j.state, JobState::Available, "{j:?}");
        assert_eq!(j.attempts.len(), 1);
        assert_eq!(j.attempts[0].outcome, AttemptOutcome::LeaseExpired);
    }
    let w = CountingWorker::start(&r);
    conveyor_tests::eventually(
        30,
        "every open job to complete on the restored store",
        || {
            let r = r.clone();
            let open = open.clone();
            async move { (completed(&r, &open).await == open.len()).then_some(()) }
        },
    )
    .await;
    // Give a duplicate run the chance to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs = w.stop().await;
    for id in &open {
        assert_eq!(
            runs.get(id),
            Some(&1),
            "job {id} ran {:?} times",
            runs.get(id)
        );
    }
    for id in &done {
        assert_eq!(
            runs.get(id),
            None,
            "job {id}, complete at backup time, ran again"
        );
        assert_eq!(
            r.get(*id).await.unwrap().unwrap().state,
            JobState::Completed
        );
    }
    assert_eq!(runs.len(), open.len());
    let _ = std::fs::remove_dir_all(&dir);
}

mod restore {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_store_carries_on() {
        let t = TestStore::sqlite().await;
        let target = scratch_dir().join("restored.db").display().to_string();
        super::restore_carries_on(t, target).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_store_carries_on() {
        let Some(t) = TestStore::postgres().await else {
            return;
        };
        let (url, _cleanup) = empty_postgres_database().await.expect("Postgres is up");
        super::restore_carries_on(t, url).await;
    }

    /// The keys under the store's prefix, restored under a fresh prefix on the same server
    /// (the other test keys there are never read: only the two prefixes are scanned).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_store_carries_on() {
        let Some(t) = TestStore::redis().await else {
            return;
        };
        let prefix = format!(
            "restored-{}",
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        );
        let target = format!("{}?prefix={prefix}", conveyor_tests::redis_url());
        super::restore_carries_on(t, target.clone()).await;
        let mut con = redis::Client::open(conveyor_tests::redis_url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        for pattern in [format!("{prefix}:*"), format!("{{{prefix}:*")] {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query_async(&mut con)
                .await
                .unwrap();
            if !keys.is_empty() {
                let _: () = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut con)
                    .await
                    .unwrap();
            }
        }
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// `prune` in a real directory: `keep_last = 1` keeps the newest backup and the newest
/// verified one; `--dry-run` deletes nothing; the pruned backups' files are all gone; an
/// empty retention is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_the_newest_and_the_newest_verified() {
    let t = TestStore::sqlite().await;
    fill(&t, 50).await;
    let dir = scratch_dir();
    let plain = backups(&t.url, &dir);
    let err = plain.prune(None, false).await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");

    let mut made = Vec::new();
    for _ in 0..4 {
        made.push(plain.create("store", None).await.unwrap().id);
    }
    plain.verify(&made[1], None).await.unwrap();
    let mut config = plain.config().clone();
    config.retention.keep_last = 1;
    let b = Backups::new(config, &t.url).unwrap();

    let before = files_under(&dir);
    let dry = b.prune(None, true).await.unwrap();
    assert!(dry.dry_run);
    let deleted: Vec<&str> = dry.deleted.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(deleted, [made[0].as_str(), made[2].as_str()]);
    assert_eq!(
        files_under(&dir).len(),
        before.len(),
        "a dry run deletes nothing"
    );

    let pruned = b.prune(None, false).await.unwrap();
    assert_eq!(pruned.deleted, dry.deleted);
    let kept: Vec<(&str, Vec<conveyor_backup::retention::Reason>)> = pruned
        .kept
        .iter()
        .map(|k| (k.id.as_str(), k.reasons.clone()))
        .collect();
    use conveyor_backup::retention::Reason;
    assert_eq!(
        kept,
        [
            (made[1].as_str(), vec![Reason::NewestVerified]),
            (made[3].as_str(), vec![Reason::Last]),
        ]
    );
    let listed: Vec<String> = b
        .destination(None)
        .unwrap()
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(listed, [made[1].clone(), made[3].clone()]);
    for gone in [&made[0], &made[2]] {
        let left = files_under(&dir.join("store").join(gone));
        assert!(left.is_empty(), "{gone} left {left:?}");
    }
    // Once the newest is verified too, the older verified one is no longer protected.
    b.verify(&made[1], None).await.unwrap();
    b.verify(&made[3], None).await.unwrap();
    let again = b.prune(None, false).await.unwrap();
    let deleted: Vec<&str> = again.deleted.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(deleted, [made[1].as_str()]);
    assert_eq!(
        again.kept[0].reasons,
        [Reason::Last, Reason::NewestVerified]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `backup.run` and `backup.prune` run by a worker (as a cron schedule's ticks are): the
/// job's result is the backup's summary and the backup is listed; an unknown source fails the
/// job at once (dead after one attempt, the reason kept); prune's result says what it kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_kinds_run_as_jobs() {
    let t = TestStore::sqlite().await;
    fill(&t, 30).await;
    let dir = scratch_dir();
    let mut config = backups(&t.url, &dir).config().clone();
    config.retention.keep_last = 1;
    let b = Arc::new(
        Backups::new(config, &t.url)
            .unwrap()
            .with_status(t.store.clone()),
    );
    let mut registry = Registry::new();
    conveyor_jobs::backup::register(&mut registry, b.clone());
    let worker = Worker::new(
        t.store.clone(),
        registry,
        WorkerConfig {
            queues: vec![QueueConfig {
                name: "maintenance".into(),
                concurrency: 1,
            }],
            poll_interval: Duration::from_millis(100),
            ..WorkerConfig::default()
        },
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(worker.run(shutdown.clone()));
    let s = t.store.clone();
    let wait = |id: JobId, state: JobState| {
        let s = s.clone();
        conveyor_tests::eventually(30, "the backup job to finish", move || {
            let s = s.clone();
            async move {
                let j = s.get(id).await.unwrap()?;
                (j.state == state).then_some(j)
            }
        })
    };

    let mut ids = Vec::new();
    for _ in 0..2 {
        let job = s
            .enqueue(NewJob::new("backup.run", json!({})).queue("maintenance"))
            .await
            .unwrap();
        let done = wait(job.id, JobState::Completed).await;
        let result: conveyor_jobs::backup::RunResult =
            serde_json::from_value(done.result.clone().expect("a result")).unwrap();
        assert_eq!(
            (result.source.as_str(), result.destination.as_str()),
            ("store", "here")
        );
        assert!(
            result.raw_bytes > 0 && result.stored_bytes > 0,
            "{result:?}"
        );
        ids.push(result.id);
    }
    let listed: Vec<String> = b
        .destination(None)
        .unwrap()
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(listed, ids);

    // The metrics' record: the newest backup's end; verified once `verify` ran.
    let newest = b.destination(None).unwrap().find(&ids[1]).await.unwrap();
    let status = conveyor_backup::status::read(t.store.as_ref())
        .await
        .unwrap();
    assert_eq!(status["store"].last_success_at, Some(newest.finished_at));
    assert_eq!(status["store"].last_verified_at, None);
    let before = chrono::Utc::now();
    b.verify(&ids[1], None).await.unwrap();
    let status = conveyor_backup::status::read(t.store.as_ref())
        .await
        .unwrap();
    assert!(status["store"].last_verified_at.unwrap() >= before);
    assert_eq!(status["store"].last_success_at, Some(newest.finished_at));
    let mut text = String::new();
    conveyor_backup::status::render(&status, &mut text);
    assert!(
        text.contains("conveyor_backup_last_success_timestamp_seconds{source=\"store\"} ")
            && text.contains("conveyor_backup_last_verified_timestamp_seconds{source=\"store\"} "),
        "{text}"
    );

    let bad = s
        .enqueue(NewJob::new("backup.run", json!({ "source": "nope" })).queue("maintenance"))
        .await
        .unwrap();
    let dead = wait(bad.id, JobState::Dead).await;
    assert_eq!(dead.attempts.len(), 1);
    let error = dead.attempts[0].error.clone().unwrap_or_default();
    assert!(error.contains("no backup source `nope`"), "{error}");

    let prune = s
        .enqueue(NewJob::new("backup.prune", json!({})).queue("maintenance"))
        .await
        .unwrap();
    let done = wait(prune.id, JobState::Completed).await;
    let result = done.result.unwrap();
    assert_eq!(result["deleted"][0]["id"], ids[0].as_str(), "{result}");
    assert_eq!(result["kept"][0]["id"], ids[1].as_str(), "{result}");

    shutdown.cancel();
    handle.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
