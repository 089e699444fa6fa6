//! Backups of the store on SQLite and Postgres into a real directory destination: created
//! while the store is in use, listed only once complete, verified by re-reading every
//! checksum; a damaged object is named by `verify`; a dump that fails leaves no backup.
//! (S3-compatible destinations, application databases and restores: see docs/backups.md.)

use std::path::{Path, PathBuf};

use conveyor_backup::config::DestinationConfig;
use conveyor_backup::manifest::SourceKind;
use conveyor_backup::{BackupConfig, Backups, DATA_OBJECT, Error};
use conveyor_tests::TestStore;
use conveyor_worker::NewJob;
use serde_json::json;
use sha2::Digest;

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
