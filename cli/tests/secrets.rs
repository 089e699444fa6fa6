//! The secrets key as a user meets it: `conveyor serve` with no configuration makes a key file
//! (mode 0600) beside the SQLite database and says so; the key rotates with `conveyor secrets
//! reencrypt`; a malformed, wrong or missing key stops the command with exit status 2 and a
//! message that says what to do, never the key.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{Process, conveyor};
use nix::sys::signal::Signal;
use sqlx::Connection;

fn output(mut cmd: Command) -> (i32, String, String) {
    let out = cmd.output().expect("the binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(cmd: Command) -> serde_json::Value {
    let (code, out, err) = output(cmd);
    assert_eq!(code, 0, "failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// `conveyor` on `url` with exactly `keys` as `CONVEYOR_SECRETS__KEYS`.
fn with_keys(url: &str, keys: &[&str], args: &[&str]) -> Command {
    let mut cmd = conveyor(url, args);
    cmd.env("CONVEYOR_SECRETS__KEYS", keys.join(","));
    cmd
}

/// The key lines of a key file.
fn keys_in(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn serve_with_no_configuration_makes_a_private_key_file_beside_the_database() {
    let dir = std::env::temp_dir().join(format!("conveyor-secrets-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_conveyor"));
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(&dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("CONVEYOR_") {
            cmd.env_remove(k);
        }
    }
    let mut serve = Process::spawn(cmd);
    let line = serve.wait_for_line("no secrets key configured", 60);
    assert!(
        line.contains("conveyor.db.keys") && line.contains("0600"),
        "{line}"
    );
    serve.wait_for_line("conveyor started", 60);
    assert_eq!(serve.stop(Signal::SIGTERM, 30), Some(0));
    let file = dir.join("conveyor.db.keys");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the key file is its owner's alone");
    let key = keys_in(&file).pop().unwrap();
    assert!(
        !serve.seen.iter().any(|l| l.contains(&key)),
        "the key is not logged"
    );

    // The next start uses it, and says nothing about generating one.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_conveyor"));
    cmd.args([
        "webhooks",
        "endpoints",
        "create",
        "--url",
        "https://example.com/h",
        "--json",
    ])
    .current_dir(&dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("CONVEYOR_") {
            cmd.env_remove(k);
        }
    }
    let (code, out, err) = output(cmd);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("generated"), "{err}");
    assert_eq!(keys_in(&file), vec![key]);
    let ep: serde_json::Value = serde_json::from_str(&out).unwrap();
    let secret = ep["secrets"][0]["secret"].as_str().unwrap();
    let raw = std::fs::read(dir.join("conveyor.db")).unwrap();
    let wal = std::fs::read(dir.join("conveyor.db-wal")).unwrap_or_default();
    for bytes in [raw, wal] {
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains(&secret[6..]),
            "the secret is in the database file"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_rotates_with_reencrypt_and_bad_keys_exit_2() {
    let t = conveyor_tests::TestStore::sqlite().await;
    let url = t.url.clone();
    let db = url.strip_prefix("sqlite://").unwrap().to_string();
    let ep = tokio::task::block_in_place(|| {
        json(conveyor(
            &url,
            &[
                "webhooks",
                "endpoints",
                "create",
                "--url",
                "https://example.com/h",
                "--json",
            ],
        ))
    });
    let id = ep["id"].as_str().unwrap().to_string();
    let secret = ep["secrets"][0]["secret"].as_str().unwrap().to_string();
    let old = keys_in(Path::new(&format!("{db}.keys"))).pop().unwrap();
    let generated = tokio::task::block_in_place(|| {
        json(conveyor(&url, &["secrets", "generate-key", "--json"]))
    });
    let new = generated["key"].as_str().unwrap().to_string();
    let (new_id, old_id) = {
        let status = tokio::task::block_in_place(|| {
            json(with_keys(
                &url,
                &[&new, &old],
                &["secrets", "status", "--json"],
            ))
        });
        assert_eq!(status["current"], generated["id"]);
        let keys: Vec<String> = serde_json::from_value(status["keys"].clone()).unwrap();
        assert_eq!(status["secrets_by_key"][&keys[1]], 1, "{status}");
        (keys[0].clone(), keys[1].clone())
    };

    let report = tokio::task::block_in_place(|| {
        json(with_keys(
            &url,
            &[&new, &old],
            &["secrets", "reencrypt", "--json"],
        ))
    });
    assert_eq!(report["reencrypted"], 1, "{report}");
    assert_eq!(
        report["secrets_by_key"],
        serde_json::json!({ new_id.clone(): 1 })
    );

    // The old key can go: the new one alone reads the secret.
    let shown = tokio::task::block_in_place(|| {
        json(with_keys(
            &url,
            &[&new],
            &[
                "webhooks",
                "endpoints",
                "show",
                &id,
                "--show-secret",
                "--json",
            ],
        ))
    });
    assert_eq!(shown["secrets"][0]["secret"], secret.as_str());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let (value,): (String,) = sqlx::query_as("SELECT value FROM meta WHERE key = ?")
        .bind(&id)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(!value.contains(&secret[6..]) && value.contains(&format!("cv1:{new_id}:")));

    // The old key alone: which key to add, exit 2.
    let (code, _, err) = tokio::task::block_in_place(|| {
        output(with_keys(
            &url,
            &[&old],
            &["webhooks", "endpoints", "show", &id],
        ))
    });
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("encrypted with key id {new_id}"))
            && err.contains(&format!("the configured keys are {old_id}"))
            && !err.contains(&old),
        "{err}"
    );

    // A malformed key: what a key looks like and how to make one; never the value.
    let bad = "c2VjcmV0LWJ1dC1zaG9ydA==";
    let (code, _, err) = tokio::task::block_in_place(|| {
        output(with_keys(&url, &[bad], &["webhooks", "endpoints", "list"]))
    });
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("CONVEYOR_SECRETS__KEYS")
            && err.contains("32 random bytes in base64")
            && err.contains("openssl rand -base64 32")
            && !err.contains(bad),
        "{err}"
    );
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_without_a_key_refuses_to_store_a_secret() {
    let Some(t) = conveyor_tests::TestStore::postgres().await else {
        return;
    };
    let (code, _, err) = tokio::task::block_in_place(|| {
        let mut cmd = conveyor(
            &t.url,
            &[
                "webhooks",
                "endpoints",
                "create",
                "--url",
                "https://example.com/h",
            ],
        );
        cmd.env_remove("CONVEYOR_SECRETS__KEYS");
        output(cmd)
    });
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no secrets key is configured")
            && err.contains("CONVEYOR_SECRETS__KEYS")
            && err.contains("conveyor secrets generate-key"),
        "{err}"
    );
    // With a key, it works (the key given by the harness).
    let (code, _, err) = tokio::task::block_in_place(|| {
        output(conveyor(
            &t.url,
            &[
                "webhooks",
                "endpoints",
                "create",
                "--url",
                "https://example.com/h",
            ],
        ))
    });
    assert_eq!(code, 0, "{err}");
    t.cleanup().await;
}
