//! `conveyor backup` as a user runs it, on a SQLite store and on Postgres: create, list,
//! show, verify (also `--restore`) and restore, a damaged backup named by `verify` and refused
//! by `restore` (exit 1), and a misconfigured
//! destination refused before anything is read (exit 2).

mod common;

use std::path::{Path, PathBuf};

use conveyor_tests::TestStore;
use serde_json::Value;

/// `conveyor backup …` with a destination `here` in `dir`, from the environment.
fn backup(url: &str, dir: &Path, args: &[&str]) -> (i32, String, String) {
    let mut cmd = common::conveyor(url, &[]);
    cmd.arg("backup")
        .args(args)
        .env("CONVEYOR_BACKUP__DESTINATION", "here")
        .env("CONVEYOR_BACKUP__DESTINATIONS__HERE__TYPE", "dir")
        .env("CONVEYOR_BACKUP__DESTINATIONS__HERE__PATH", dir);
    let out = tokio::task::block_in_place(|| cmd.output()).expect("the binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn backup_json(url: &str, dir: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = backup(url, dir, &all);
    assert_eq!(code, 0, "backup {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!(
        "conveyor-backup-cli-{}",
        uuid::Uuid::now_v7().simple()
    ))
}

async fn backs_up_verifies_and_names_damage(t: TestStore) {
    let url = t.url.clone();
    for i in 0..20 {
        common::run_json(
            &url,
            &[
                "enqueue",
                "--kind",
                "noop",
                "--args",
                &format!("{{\"i\":{i}}}"),
            ],
        );
    }
    let dir = scratch();
    let (code, out, _) = backup(&url, &dir, &["list"]);
    assert_eq!(code, 0);
    assert!(out.contains("no complete backups"), "{out}");

    let manifest = backup_json(&url, &dir, &["create"]);
    let id = manifest["id"].as_str().unwrap().to_string();
    let jobs = manifest["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "jobs" || t["table"] == "conveyor.jobs")
        .cloned()
        .unwrap_or_else(|| panic!("{manifest}"));
    assert_eq!(jobs["rows"], 20, "{manifest}");

    let listed = backup_json(&url, &dir, &["list"]);
    assert_eq!(listed[0]["id"], id.as_str(), "{listed}");
    assert_eq!(backup_json(&url, &dir, &["show", &id]), manifest);
    let verified = backup_json(&url, &dir, &["verify", &id]);
    assert_eq!(verified["objects"], 1, "{verified}");

    // verify --restore: a scratch copy matches the recorded figures.
    let checked = backup_json(&url, &dir, &["verify", &id, "--restore"]);
    assert_eq!(checked["tables"], manifest["tables"], "{checked}");
    // Restoring over the live store is refused (exit 1) and says how to force it.
    let (code, _, err) = backup(&url, &dir, &["restore", &id, "--to", &url]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    if url.starts_with("sqlite") {
        let file = dir.join("restored.db");
        let restored = backup_json(
            &url,
            &dir,
            &["restore", &id, "--to", &file.display().to_string()],
        );
        assert_eq!(restored["tables"], manifest["tables"], "{restored}");
        assert_eq!(restored["jobs"]["still_leased"], 0, "{restored}");
        // The restored store lists the jobs.
        let listed = common::run_json(
            &format!("sqlite://{}", file.display()),
            &["jobs", "list", "--limit", "100"],
        );
        assert_eq!(listed.as_array().map(Vec::len), Some(20), "{listed}");
    }

    // Each operation that succeeded is in the store's audit log, by the OS user (the refused
    // restore is not).
    let audit = common::run_json(&url, &["audit", "list"]);
    let backup_entries: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["action"]
                .as_str()
                .is_some_and(|a| a.starts_with("backup."))
        })
        .collect();
    let actions: Vec<&str> = backup_entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    let mut expected = vec!["backup.verify", "backup.verify", "backup.create"];
    if url.starts_with("sqlite") {
        expected.insert(0, "backup.restore");
        assert_eq!(
            backup_entries[0]["target"]["target"],
            dir.join("restored.db").display().to_string(),
            "{audit}"
        );
    }
    assert_eq!(actions, expected, "{audit}");
    let create = backup_entries.last().unwrap();
    assert!(
        create["actor"]["name"]
            .as_str()
            .unwrap()
            .starts_with("cli:"),
        "{create}"
    );
    assert_eq!(create["target"]["backup"], id.as_str(), "{create}");
    assert_eq!(create["target"]["destination"], "here", "{create}");

    // The backup kinds cannot be enqueued as ordinary jobs (exit 2, saying what to use).
    let mut cmd = common::conveyor(&url, &["enqueue", "--kind", "backup.prune"]);
    let out = tokio::task::block_in_place(|| cmd.output()).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("conveyor backup"), "{err}");

    // Truncate the stored object: verify exits 1 naming the backup and the object.
    let object = dir.join("store").join(&id).join("data.zst");
    let bytes = std::fs::read(&object).unwrap();
    std::fs::write(&object, &bytes[..bytes.len() / 2]).unwrap();
    let (code, _, err) = backup(&url, &dir, &["verify", &id]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&id) && err.contains("data.zst"), "{err}");
    // ... and restore refuses it, naming the object, writing nothing (the damage is found
    // before the Postgres target is even looked at).
    let fresh = dir.join("never.db");
    let target = if url.starts_with("sqlite") {
        fresh.display().to_string()
    } else {
        url.clone()
    };
    let (code, _, err) = backup(&url, &dir, &["restore", &id, "--to", &target]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&id) && err.contains("data.zst"), "{err}");
    assert!(!fresh.exists());

    // An unknown `--destination` is named with the configured ones; a config whose default
    // destination names nothing is a config error (exit 2).
    let (code, _, err) = backup(&url, &dir, &["create", "--destination", "elsewhere"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("elsewhere") && err.contains("here"), "{err}");
    let mut cmd = common::conveyor(&url, &["backup", "list"]);
    cmd.env("CONVEYOR_BACKUP__DESTINATION", "nowhere");
    let out = tokio::task::block_in_place(|| cmd.output()).unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("backup.destination"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_store() {
    backs_up_verifies_and_names_damage(TestStore::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_store() {
    if let Some(t) = TestStore::postgres().await {
        backs_up_verifies_and_names_damage(t).await;
    }
}

/// `conveyor backup create` killed with SIGKILL while it uploads (a 64 MiB incompressible
/// SQLite source): nothing is listed as complete; the next run writes a complete backup that
/// verifies.
#[tokio::test(flavor = "multi_thread")]
async fn killed_mid_upload_lists_nothing_and_the_retry_completes() {
    use sqlx::Connection;
    let t = TestStore::sqlite().await;
    let dir = scratch();
    std::fs::create_dir_all(&dir).unwrap();
    let big = dir.join("big.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", big.display()))
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE blobs (b BLOB);
         WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 64)
         INSERT INTO blobs SELECT randomblob(1048576) FROM n;",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let dest = dir.join("backups");
    let create = || {
        let mut cmd = common::conveyor(&t.url, &["backup", "create", "--source", "big", "--json"]);
        cmd.env("CONVEYOR_BACKUP__DESTINATION", "here")
            .env("CONVEYOR_BACKUP__DESTINATIONS__HERE__TYPE", "dir")
            .env("CONVEYOR_BACKUP__DESTINATIONS__HERE__PATH", &dest)
            .env("CONVEYOR_BACKUP__SOURCES__BIG__TYPE", "sqlite")
            .env("CONVEYOR_BACKUP__SOURCES__BIG__PATH", &big)
            .env("CONVEYOR_BACKUP__SCRATCH_DIR", dir.join("scratch"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd
    };
    let mut child = create().spawn().expect("the binary runs");
    // Kill it once the upload has stored bytes under the backup's folder (a part written).
    let started = std::time::Instant::now();
    loop {
        let written = std::fs::read_dir(dest.join("big"))
            .ok()
            .and_then(|mut ids| ids.next())
            .and_then(|id| std::fs::read_dir(id.ok()?.path()).ok())
            .is_some_and(|mut files| {
                files.any(|f| {
                    f.ok()
                        .and_then(|f| f.metadata().ok())
                        .is_some_and(|m| m.len() > 0)
                })
            });
        if written {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup finished before it could be killed: make the source larger"
        );
        assert!(started.elapsed().as_secs() < 60, "no upload started");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let (code, out, err) = backup(&t.url, &dest, &["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no complete backups"), "{out}");

    let out = tokio::task::block_in_place(|| create().output()).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(manifest["tables"][0]["rows"], 64, "{manifest}");
    let listed = backup_json(&t.url, &dest, &["list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["id"], manifest["id"]);
    let verified = backup_json(&t.url, &dest, &["verify", manifest["id"].as_str().unwrap()]);
    assert_eq!(verified["raw_bytes"], manifest["objects"][0]["raw_bytes"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `conveyor backup …` with the destination of [`backup`] and more environment.
fn backup_with(
    url: &str,
    dir: &Path,
    env: &[(&str, &Path)],
    args: &[&str],
) -> (i32, String, String) {
    let mut cmd = common::conveyor(url, &[]);
    cmd.arg("backup")
        .args(args)
        .env("CONVEYOR_BACKUP__DESTINATION", "here")
        .env("CONVEYOR_BACKUP__DESTINATIONS__HERE__TYPE", "dir")
        .env("CONVEYOR_BACKUP__DESTINATIONS__HERE__PATH", dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::task::block_in_place(|| cmd.output()).expect("the binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An encrypted backup from the command line: `verify` without an identity checks the stored
/// bytes and says it could not decode (exit 0); `verify --restore` and `restore` refuse
/// (exit 2) without one or with a stranger's (`--identity`), and succeed with the
/// recipient's; a bad recipients file is refused at start (exit 2).
#[tokio::test(flavor = "multi_thread")]
async fn encrypted_backups() {
    use age::secrecy::ExposeSecret;
    let t = TestStore::sqlite().await;
    let url = t.url.clone();
    let dir = scratch();
    std::fs::create_dir_all(&dir).unwrap();
    let key = |name: &str| {
        let identity = age::x25519::Identity::generate();
        let path = dir.join(name);
        std::fs::write(&path, format!("{}\n", identity.to_string().expose_secret())).unwrap();
        (path, identity.to_public().to_string())
    };
    let (identity, recipient) = key("backup.key");
    let (stranger, _) = key("stranger.key");
    let recipients = dir.join("recipients.txt");
    std::fs::write(&recipients, format!("{recipient}\n")).unwrap();
    let backups = dir.join("backups");
    let env = [("CONVEYOR_BACKUP__RECIPIENTS_FILE", recipients.as_path())];

    let (code, out, err) = backup_with(&url, &backups, &env, &["create", "--json"]);
    assert_eq!(code, 0, "{err}");
    let manifest: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(manifest["encryption"]["recipients"], 1, "{manifest}");
    let id = manifest["id"].as_str().unwrap().to_string();
    let (code, out, err) = backup_with(&url, &backups, &env, &["show", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("encryption age to 1 recipient(s)"), "{out}");

    let (code, out, err) = backup_with(&url, &backups, &env, &["verify", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("could not be decoded") && out.contains("--identity"),
        "{out}"
    );

    let target = dir.join("restored.db");
    let target_arg = target.display().to_string();
    for args in [
        vec!["verify", &id, "--restore"],
        vec!["restore", &id, "--to", &target_arg],
    ] {
        let (code, _, err) = backup_with(&url, &backups, &env, &args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains("backup.identity_file") && err.contains("--identity"),
            "{err}"
        );
    }
    let stranger_arg = stranger.display().to_string();
    let (code, _, err) = backup_with(
        &url,
        &backups,
        &env,
        &[
            "restore",
            &id,
            "--to",
            &target_arg,
            "--identity",
            &stranger_arg,
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no identity matches this backup's recipients"),
        "{err}"
    );
    assert!(!target.exists(), "nothing written");
    let missing = dir.join("missing.key").display().to_string();
    let (code, _, err) = backup_with(
        &url,
        &backups,
        &env,
        &["verify", &id, "--identity", &missing],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--identity") && err.contains("missing.key"),
        "{err}"
    );

    let identity_arg = identity.display().to_string();
    let (code, out, err) = backup_with(
        &url,
        &backups,
        &env,
        &["verify", &id, "--restore", "--identity", &identity_arg],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("verified and restored"), "{out}");
    let with_identity = [
        ("CONVEYOR_BACKUP__RECIPIENTS_FILE", recipients.as_path()),
        ("CONVEYOR_BACKUP__IDENTITY_FILE", identity.as_path()),
    ];
    let (code, out, err) = backup_with(
        &url,
        &backups,
        &with_identity,
        &["restore", &id, "--to", &target_arg],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("restored into"), "{out}");

    std::fs::write(&recipients, "age1nope\n").unwrap();
    let (code, _, err) = backup_with(&url, &backups, &env, &["create"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("backup.recipients_file") && err.contains("line 1"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
