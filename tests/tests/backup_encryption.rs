//! Backups encrypted with age to X25519 recipients, on SQLite and Postgres stores: the stored
//! object is an age file (not zstd, not the dump); `verify` without an identity checks the
//! stored bytes and says it could not decode; `verify --restore` and `restore` refuse without
//! one; each recipient's identity restores; an identity of no recipient is refused and
//! nothing is written.

use std::path::{Path, PathBuf};

use age::secrecy::ExposeSecret;
use conveyor_backup::config::DestinationConfig;
use conveyor_backup::{BackupConfig, Backups, DATA_OBJECT, Error};
use conveyor_tests::TestStore;
use conveyor_worker::NewJob;
use serde_json::json;

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "conveyor-backup-age-test-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A new identity, written to `dir/name` as `age-keygen` writes it; its recipient.
fn keypair(dir: &Path, name: &str) -> (PathBuf, String) {
    let identity = age::x25519::Identity::generate();
    let path = dir.join(name);
    let recipient = identity.to_public().to_string();
    std::fs::write(
        &path,
        format!(
            "# created: for a test\n# public key: {recipient}\n{}\n",
            identity.to_string().expose_secret()
        ),
    )
    .unwrap();
    (path, recipient)
}

fn config(dir: &Path) -> BackupConfig {
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
    config
}

fn config_error(e: Error, wanted: &[&str]) {
    let Error::Config(message) = &e else {
        panic!("expected a configuration error, got {e:?}");
    };
    for w in wanted {
        assert!(message.contains(w), "`{w}` not in: {message}");
    }
}

async fn encrypted_round_trip(t: TestStore, targets: [String; 3], target_exists: fn(&str) -> bool) {
    let jobs = (0..200)
        .map(|i| NewJob::new("noop", json!({ "i": i, "pad": "x".repeat(200) })))
        .collect();
    t.store.enqueue_many(jobs).await.expect("enqueue");
    let keys = scratch_dir();
    let dir = keys.join("backups");
    let (first_identity, first) = keypair(&keys, "first.key");
    let (second_identity, second) = keypair(&keys, "second.key");
    let (stranger_identity, _) = keypair(&keys, "stranger.key");
    // One recipient listed, one in a recipients file.
    let recipients_file = keys.join("recipients.txt");
    std::fs::write(&recipients_file, format!("# the second one\n\n{second}\n")).unwrap();
    let mut cfg = config(&dir);
    cfg.recipients = vec![first.clone()];
    cfg.recipients_file = Some(recipients_file);
    let b = Backups::new(cfg.clone(), &t.url).expect("a valid config");

    let manifest = b.create("store", None).await.expect("backup");
    let encryption = manifest.encryption.clone().expect("recorded as encrypted");
    assert_eq!(
        (encryption.scheme.as_str(), encryption.recipients),
        ("age", 2)
    );
    let object = &manifest.objects[0];
    assert_eq!(object.encoding, ["zstd", "age"]);
    // The manifest says how many, never who.
    let text = std::fs::read_to_string(dir.join("store").join(&manifest.id).join("manifest.json"))
        .unwrap();
    assert!(!text.contains(&first) && !text.contains(&second), "{text}");
    // The stored object is an age file: neither zstd nor the plain dump.
    let stored = std::fs::read(dir.join("store").join(&manifest.id).join(DATA_OBJECT)).unwrap();
    assert!(
        stored.starts_with(b"age-encryption.org/v1\n"),
        "{:?}",
        &stored[..32]
    );
    assert_eq!(stored.len() as u64, object.stored_bytes);
    assert!(object.raw_bytes > 0);

    // Without an identity: the stored bytes are checked, the content is not decoded, and the
    // backup is not recorded as verified.
    let verified = b
        .verify(&manifest.id, None)
        .await
        .expect("stored bytes match");
    assert_eq!(verified.undecoded, [DATA_OBJECT]);
    assert_eq!(verified.stored_bytes, object.stored_bytes);
    assert_eq!(verified.raw_bytes, 0);
    assert!(
        !dir.join("store")
            .join(&manifest.id)
            .join("verified.json")
            .exists()
    );
    // ... while verify --restore and restore refuse, naming where an identity goes.
    config_error(
        b.verify_restore(&manifest.id, None).await.unwrap_err(),
        &["backup.identity_file", "--identity", "encrypted"],
    );
    config_error(
        b.restore(&manifest.id, &targets[0], false, None)
            .await
            .unwrap_err(),
        &["backup.identity_file", "--identity"],
    );
    assert!(!target_exists(&targets[0]), "nothing written");

    // An identity of no recipient is refused, and nothing is written.
    let stranger = b.clone().with_identity(stranger_identity);
    config_error(
        stranger.verify(&manifest.id, None).await.unwrap_err(),
        &["no identity matches this backup's recipients"],
    );
    config_error(
        stranger
            .restore(&manifest.id, &targets[0], false, None)
            .await
            .unwrap_err(),
        &["no identity matches this backup's recipients"],
    );
    assert!(!target_exists(&targets[0]), "nothing written");

    // The first recipient (`--identity`): verify decodes and checks, verify --restore and
    // restore match the recorded figures (the target was left empty above: no --force).
    let with_first = b.clone().with_identity(first_identity);
    let verified = with_first.verify(&manifest.id, None).await.expect("verify");
    assert!(verified.undecoded.is_empty());
    assert_eq!(verified.raw_bytes, object.raw_bytes);
    with_first
        .verify_restore(&manifest.id, None)
        .await
        .expect("verify --restore");
    let restored = with_first
        .restore(&manifest.id, &targets[0], false, None)
        .await
        .expect("restore with the first identity");
    assert_eq!(restored.tables, manifest.tables);

    // The second recipient (`backup.identity_file`) restores too.
    let mut with_second = cfg.clone();
    with_second.identity_file = Some(second_identity);
    let with_second = Backups::new(with_second, &t.url).unwrap();
    let restored = with_second
        .restore(&manifest.id, &targets[1], false, None)
        .await
        .expect("restore with the second identity");
    assert_eq!(restored.tables, manifest.tables);

    // A damaged ciphertext is found without an identity.
    let path = dir.join("store").join(&manifest.id).join(DATA_OBJECT);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    match b.verify(&manifest.id, None).await {
        Err(Error::Damaged { message, .. }) => {
            assert!(message.contains("stored bytes differ"), "{message}")
        }
        other => panic!("expected damage, got {other:?}"),
    }
    // ... and with one, nothing is restored from it.
    assert!(
        with_first
            .restore(&manifest.id, &targets[2], false, None)
            .await
            .is_err()
    );
    let _ = std::fs::remove_dir_all(&keys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_encrypted_round_trip() {
    let t = TestStore::sqlite().await;
    let dir = scratch_dir();
    let targets = ["a.db", "b.db", "c.db"].map(|f| dir.join(f).display().to_string());
    encrypted_round_trip(t, targets, |p| Path::new(p).exists()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn empty_postgres_database() -> (String, conveyor_tests::Cleanup) {
    use sqlx::Connection;
    let admin_url = conveyor_tests::pg_admin_url();
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
    let name = format!("conveyor_t_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("the test role may create databases");
    let _ = admin.close().await;
    let url = conveyor_tests::replace_db(&admin_url, &name);
    (url, conveyor_tests::Cleanup::Database { admin_url, name })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_encrypted_round_trip() {
    let Some(t) = TestStore::postgres().await else {
        return;
    };
    let (a, _a) = empty_postgres_database().await;
    let (b, _b) = empty_postgres_database().await;
    let (c, _c) = empty_postgres_database().await;
    // A restore that wrote nothing leaves the database without a `conveyor` schema.
    encrypted_round_trip(t, [a, b, c], |url| {
        let url = url.to_string();
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async move {
                use sqlx::Connection;
                let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM information_schema.schemata WHERE schema_name = 'conveyor'",
                )
                .fetch_one(&mut c)
                .await
                .unwrap();
                n > 0
            })
        })
        .join()
        .unwrap()
    })
    .await;
}

#[test]
fn bad_recipients_and_identity_files_are_configuration_errors() {
    let dir = scratch_dir();
    let mut cfg = config(&dir);
    cfg.recipients = vec!["age1nope".into()];
    config_error(
        Backups::new(cfg.clone(), "sqlite://unused.db").unwrap_err(),
        &["backup.recipients[0]", "age1nope", "age-keygen"],
    );
    cfg.recipients = Vec::new();
    cfg.recipients_file = Some(dir.join("missing.txt"));
    config_error(
        Backups::new(cfg.clone(), "sqlite://unused.db").unwrap_err(),
        &["backup.recipients_file", "missing.txt"],
    );
    cfg.recipients_file = None;
    cfg.identity_file = Some(dir.join("missing.key"));
    let b = Backups::new(cfg.clone(), "sqlite://unused.db").unwrap();
    config_error(
        b.identities().unwrap_err(),
        &["backup.identity_file", "missing.key"],
    );
    let not_a_key = dir.join("not-a-key");
    std::fs::write(&not_a_key, "AGE-SECRET-KEY-1NOTAKEY\n").unwrap();
    config_error(
        b.with_identity(not_a_key).identities().unwrap_err(),
        &["--identity", "line 1", "AGE-SECRET-KEY-1"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}
