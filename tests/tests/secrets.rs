//! Webhook signing secrets at rest, on every backend: the store's raw rows and hashes never
//! hold a secret, deliveries still verify with the secret in clear, the encryption key rotates
//! with `reencrypt`, a missing or wrong key is a clear error, a sealed secret copied to another
//! endpoint does not open, and plain-text secrets of an older store are encrypted at start.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::Utc;
use conveyor_jobs::webhook::endpoint::{NewEndpoint, SealPass};
use conveyor_jobs::webhook::event::SendEvent;
use conveyor_jobs::webhook::model::ENDPOINTS;
use conveyor_jobs::webhook::{self, Endpoint, Secret, WebhookConfig, WebhookError, Webhooks};
use conveyor_tests::receiver::{Received, Receiver};
use conveyor_tests::{TestStore, eventually, keys_with_prefix};
use conveyor_worker::keyring::{Key, KeyError, Keyring};
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::store::meta::{Expect, Put};
use conveyor_worker::{JobId, JobState, Registry, Store};
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

/// One test per backend, each given its `TestStore` (the tests read the store raw by URL).
macro_rules! raw_backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let t = conveyor_tests::TestStore::sqlite().await;
                    super::$name(&t).await;
                    t.cleanup().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(t) = conveyor_tests::TestStore::postgres().await else { return };
                    super::$name(&t).await;
                    t.cleanup().await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(t) = conveyor_tests::TestStore::redis().await else { return };
                    super::$name(&t).await;
                    t.cleanup().await;
                }
            )*
        }
    };
}

raw_backend_tests!(
    secrets_never_reach_the_raw_store_and_deliveries_verify,
    plaintext_secrets_of_an_older_store_are_encrypted_at_start,
    the_encryption_key_rotates_with_reencrypt,
    missing_and_wrong_keys_are_clear_errors,
    a_sealed_secret_copied_to_another_endpoint_does_not_open,
);

fn config() -> WebhookConfig {
    WebhookConfig {
        allow_cidrs: vec!["127.0.0.0/8".parse().unwrap()],
        endpoint_cache: Duration::ZERO,
        health_flush: Duration::ZERO,
        timeout: Duration::from_secs(5),
        ..WebhookConfig::default()
    }
}

fn hooks(store: &Arc<dyn Store>, keys: &[&Key]) -> Webhooks {
    Webhooks::new(store.clone(), config())
        .unwrap()
        .with_keyring(Keyring::new(keys.iter().map(|k| (*k).clone())))
}

/// Everything the store keeps beside the jobs, as stored: SQLite's and Postgres' `meta`
/// rows, every Redis key of the test's prefix (hash fields and values alike).
async fn raw_store(t: &TestStore) -> String {
    if t.url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(&t.url).await.unwrap();
        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT collection, key, value FROM meta")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        return format!("{rows:?}");
    }
    if t.url.starts_with("postgres") {
        let mut conn = sqlx::PgConnection::connect(&t.url).await.unwrap();
        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT collection, key, value::text FROM conveyor.meta")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        return format!("{rows:?}");
    }
    let (server, prefix) = t.url.split_once("?prefix=").unwrap();
    let client = ::redis::Client::open(server).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut out = String::new();
    for key in keys_with_prefix(&mut conn, prefix).await.unwrap() {
        let kind: String = ::redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let value: Vec<String> = match kind.as_str() {
            "hash" => {
                ::redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
            }
            "string" => ::redis::cmd("GET")
                .arg(&key)
                .query_async::<String>(&mut conn)
                .await
                .map(|v| vec![v]),
            "zset" => {
                ::redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn)
                    .await
            }
            "set" => {
                ::redis::cmd("SMEMBERS")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
            }
            "list" => {
                ::redis::cmd("LRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn)
                    .await
            }
            _ => Ok(Vec::new()),
        }
        .unwrap();
        out.push_str(&format!("{key} {value:?}\n"));
    }
    assert!(out.contains(":r:webhook_endpoints:"), "{out}");
    out
}

/// Whether `raw` holds `secret`, whole or as its key bytes in base64.
fn reveals(raw: &str, secret: &str) -> bool {
    raw.contains(secret) || raw.contains(secret.strip_prefix("whsec_").unwrap())
}

/// Writes `ep` as stores kept endpoints before secrets were sealed: the record in clear.
async fn put_legacy(store: &Arc<dyn Store>, ep: &Endpoint) {
    let value = serde_json::to_value(ep).unwrap();
    store
        .meta_put(Put::new(ENDPOINTS, &ep.id, &value).expect(Expect::Absent))
        .await
        .unwrap();
}

fn legacy_endpoint(url: String) -> Endpoint {
    let now = Utc::now();
    Endpoint {
        id: format!("ep_{}", uuid::Uuid::now_v7().simple()),
        url,
        description: String::new(),
        enabled: true,
        event_types: Vec::new(),
        headers: Default::default(),
        secrets: vec![
            Secret {
                secret: webhook::signature::generate_secret(),
                expires_at: None,
            },
            Secret {
                secret: webhook::signature::generate_secret(),
                expires_at: Some(now + chrono::Duration::hours(1)),
            },
        ],
        rate_limit: None,
        timeout_ms: None,
        retry_schedule_ms: None,
        follow_redirects: None,
        created_at: now,
        updated_at: now,
        disabled_reason: None,
    }
}

/// The signature computed here with hmac/sha2, not with the function that signs.
fn signed_by(secret: &str, r: &Received) -> bool {
    let key = B64.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    let id = r.header("webhook-id").unwrap();
    let ts = r.header("webhook-timestamp").unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&r.body);
    let want = format!("v1,{}", B64.encode(mac.finalize().into_bytes()));
    r.header("webhook-signature")
        .unwrap_or_default()
        .split(' ')
        .any(|s| s == want)
}

/// Sends one event through a worker running `hooks`, and returns what the receiver got.
async fn deliver(store: &Arc<dyn Store>, hooks: Webhooks, rx: &Receiver, path: &str) -> Received {
    let hooks = Arc::new(hooks);
    let mut registry = Registry::new();
    webhook::register(&mut registry, hooks.clone());
    let worker = Worker::new(
        store.clone(),
        registry,
        WorkerConfig {
            queues: vec![QueueConfig {
                name: hooks.config().queue.clone(),
                concurrency: 4,
            }],
            poll_interval: Duration::from_millis(20),
            shutdown_grace: Duration::from_secs(5),
            ..WorkerConfig::default()
        },
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(worker.run(shutdown.clone()));
    let sent = hooks
        .send_event(SendEvent {
            event_type: "invoice.paid".into(),
            payload: json!({"invoice": 7}),
            idempotency_key: None,
        })
        .await
        .unwrap();
    let job: JobId = sent.event.deliveries[0].job_id.parse().unwrap();
    eventually(30, "the delivery to complete", || {
        let store = store.clone();
        async move {
            let j = store.get(job).await.unwrap()?;
            (j.state == JobState::Completed).then_some(())
        }
    })
    .await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    rx.received(path).pop().unwrap()
}

async fn secrets_never_reach_the_raw_store_and_deliveries_verify(t: &TestStore) {
    let key = Key::generate();
    let h = hooks(&t.store, &[&key]);
    let rx = Receiver::start().await;
    let ep = h
        .create_endpoint(NewEndpoint {
            url: rx.url("/hook"),
            ..NewEndpoint::default()
        })
        .await
        .unwrap();
    let first = ep.secrets[0].secret.clone();
    // Rotated out, the first secret keeps signing for the overlap: it is kept, sealed too.
    let rotated = h
        .rotate_secret(&ep.id, None, Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    let second = rotated.secrets[0].secret.clone();
    assert_eq!(rotated.secrets.len(), 2);

    let raw = raw_store(t).await;
    assert!(
        !reveals(&raw, &first),
        "the rotated-out secret is in the store: {raw}"
    );
    assert!(
        !reveals(&raw, &second),
        "the current secret is in the store: {raw}"
    );
    assert!(raw.contains(&format!("cv1:{}:", key.id())), "{raw}");
    assert!(
        !raw.contains(key.to_base64().as_str()),
        "the key is in the store"
    );

    // Read back in clear, by another process's service with the same key.
    let other = hooks(&t.store, &[&key]);
    let read = other.endpoint(&ep.id).await.unwrap();
    assert_eq!(read.secrets, rotated.secrets);

    let got = deliver(&t.store, other, &rx, "/hook").await;
    assert!(signed_by(&second, &got), "the current secret signs");
    assert!(signed_by(&first, &got), "the rotated-out secret signs");
}

async fn plaintext_secrets_of_an_older_store_are_encrypted_at_start(t: &TestStore) {
    let rx = Receiver::start().await;
    let legacy = legacy_endpoint(rx.url("/old"));
    put_legacy(&t.store, &legacy).await;
    let raw = raw_store(t).await;
    assert!(
        reveals(&raw, &legacy.secrets[0].secret),
        "the test wrote it in clear"
    );

    // With no key, the start refuses to leave them in clear, and says what to set.
    let err = hooks(&t.store, &[])
        .seal_secrets(SealPass::Plaintext)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, WebhookError::Secrets(KeyError::NoKey { .. }))
            && text.contains("2 webhook signing secret(s) are stored in clear")
            && text.contains("secrets.keys"),
        "{text}"
    );

    let key = Key::generate();
    let h = hooks(&t.store, &[&key]);
    // Before the pass, the record still reads.
    assert_eq!(h.endpoint(&legacy.id).await.unwrap(), legacy);
    let report = h.seal_secrets(SealPass::Plaintext).await.unwrap();
    assert_eq!((report.endpoints, report.sealed), (1, 2));
    assert_eq!(report.by_key.get(key.id()), Some(&2));
    assert!(!report.by_key.contains_key("plaintext"));
    let raw = raw_store(t).await;
    for s in &legacy.secrets {
        assert!(!reveals(&raw, &s.secret), "{raw}");
    }
    // Nothing lost: the same secrets, the same expiry, the rest of the record as it was.
    let read = h.endpoint(&legacy.id).await.unwrap();
    assert_eq!(read, legacy);
    // A second start finds nothing to do.
    assert_eq!(h.seal_secrets(SealPass::Plaintext).await.unwrap().sealed, 0);

    let got = deliver(&t.store, h, &rx, "/old").await;
    assert!(signed_by(&legacy.secrets[0].secret, &got));
    assert!(signed_by(&legacy.secrets[1].secret, &got));
}

async fn the_encryption_key_rotates_with_reencrypt(t: &TestStore) {
    let (old, new) = (Key::generate(), Key::generate());
    let before = hooks(&t.store, &[&old]);
    let ep = before
        .create_endpoint(NewEndpoint {
            url: "https://example.com/hook".into(),
            ..NewEndpoint::default()
        })
        .await
        .unwrap();

    // The new key first: values under the old one still open (serve keeps working).
    let both = hooks(&t.store, &[&new, &old]);
    assert_eq!(both.endpoint(&ep.id).await.unwrap(), ep);
    let status = both.seal_secrets(SealPass::Check).await.unwrap();
    assert_eq!(status.by_key.get(old.id()), Some(&1));
    // The start's pass leaves them under the old key; only reencrypt moves them.
    assert_eq!(
        both.seal_secrets(SealPass::Plaintext)
            .await
            .unwrap()
            .reencrypted,
        0
    );
    let report = both.seal_secrets(SealPass::Reencrypt).await.unwrap();
    assert_eq!(report.reencrypted, 1);
    assert_eq!(
        report.by_key.into_iter().collect::<Vec<_>>(),
        vec![(new.id().to_string(), 1)]
    );
    assert!(!raw_store(t).await.contains(&format!("cv1:{}:", old.id())));

    // The old key can go now.
    let after = hooks(&t.store, &[&new]);
    assert_eq!(after.endpoint(&ep.id).await.unwrap(), ep);
    // And a process still on the old key alone is told which key to add.
    let err = hooks(&t.store, &[&old])
        .endpoint(&ep.id)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("encrypted with key id {}", new.id()))
            && err.contains(&format!("the configured keys are {}", old.id())),
        "{err}"
    );
}

async fn missing_and_wrong_keys_are_clear_errors(t: &TestStore) {
    let (key, wrong) = (Key::generate(), Key::generate());
    let ep = hooks(&t.store, &[&key])
        .create_endpoint(NewEndpoint {
            url: "https://example.com/hook".into(),
            ..NewEndpoint::default()
        })
        .await
        .unwrap();
    let secret = &ep.secrets[0].secret;
    let never_shown = |text: &str| {
        !reveals(text, secret)
            && !text.contains(key.to_base64().as_str())
            && !text.contains(wrong.to_base64().as_str())
    };

    let err = hooks(&t.store, &[&wrong])
        .endpoint(&ep.id)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, WebhookError::Secrets(KeyError::UnknownKey { .. }))
            && text.contains(&format!(
                "the store's secrets were encrypted with key id {}; the configured keys are {}; add the key",
                key.id(),
                wrong.id()
            ))
            && never_shown(&text),
        "{text}"
    );
    // The start refuses too, before any delivery would fail.
    let err = hooks(&t.store, &[&wrong])
        .seal_secrets(SealPass::Plaintext)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(key.id()) && never_shown(&err), "{err}");

    let none = hooks(&t.store, &[]);
    let err = none.endpoint(&ep.id).await.unwrap_err().to_string();
    assert!(
        err.contains("no secrets key is configured")
            && err.contains(&format!("encrypted with key id {}", key.id()))
            && err.contains("openssl rand -base64 32")
            && never_shown(&err),
        "{err}"
    );
    let err = none
        .create_endpoint(NewEndpoint {
            url: "https://example.com/other".into(),
            ..NewEndpoint::default()
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no secrets key is configured"), "{err}");
    assert!(none.endpoints().await.is_err());
}

async fn a_sealed_secret_copied_to_another_endpoint_does_not_open(t: &TestStore) {
    let key = Key::generate();
    let h = hooks(&t.store, &[&key]);
    let new = |url: &str| NewEndpoint {
        url: url.into(),
        ..NewEndpoint::default()
    };
    let a = h
        .create_endpoint(new("https://example.com/a"))
        .await
        .unwrap();
    let b = h
        .create_endpoint(new("https://example.com/b"))
        .await
        .unwrap();
    // Someone with write access to the store gives b the sealed secret of a.
    let a_raw = t.store.meta_get(ENDPOINTS, &a.id).await.unwrap().unwrap();
    let b_raw = t.store.meta_get(ENDPOINTS, &b.id).await.unwrap().unwrap();
    let mut swapped = b_raw.value.clone();
    swapped["secrets"] = a_raw.value["secrets"].clone();
    t.store
        .meta_put(Put::new(ENDPOINTS, &b.id, &swapped).expect(Expect::Version(b_raw.version)))
        .await
        .unwrap();
    let err = h.endpoint(&b.id).await.unwrap_err();
    assert!(
        matches!(err, WebhookError::Secrets(KeyError::Tampered { .. })),
        "{err}"
    );
    assert!(err.to_string().contains(&b.id), "{err}");
    assert_eq!(h.endpoint(&a.id).await.unwrap(), a);
}
