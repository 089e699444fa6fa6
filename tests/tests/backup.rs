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
