//! Test harness shared by the cross-crate suites in `tests/tests/`.
//!
//! Every test gets a store of its own: a fresh SQLite file in a temp folder, or a fresh
//! Postgres database (`conveyor_t_<uuid>`) created on the server named by
//! `CONVEYOR_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) and dropped
//! afterwards, or a fresh key prefix (`conveyor_t_<uuid>`) on the Redis server named by
//! `CONVEYOR_TEST_REDIS_URL` (default `redis://127.0.0.1:6379/0`), whose keys are deleted
//! afterwards with `SCAN MATCH` + `DEL` (never `FLUSHDB`: the server may be shared). When
//! Postgres or Redis is unreachable, its tests are skipped with a printed reason, except under
//! `CI=true`, where they fail.
//!
//! [`backend_tests!`] turns a list of `async fn(Arc<dyn Store>)` into one `#[tokio::test]` per
//! backend, so the same suite runs everywhere.

pub mod pgbouncer;
pub mod process;
pub mod receiver;
pub mod redis_server;
pub mod smtp;
pub mod tls;

use std::path::PathBuf;
use std::sync::Arc;

use conveyor_worker::Store;
use conveyor_worker::store::{self, Pooler, StoreOptions};
use sqlx::Connection;

/// A store made for one test, cleaned up by [`TestStore::cleanup`].
pub struct TestStore {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Its URL, for tests that open a second connection or process.
    pub url: String,
    _cleanup: Cleanup,
}

/// What a test's store leaves behind, removed when dropped.
pub enum Cleanup {
    File(PathBuf),
    Database {
        admin_url: String,
        name: String,
    },
    Prefix {
        url: String,
        prefix: String,
    },
    /// A PgBouncer in front of a database: stopped before the database is dropped.
    Pooled {
        bouncer: pgbouncer::PgBouncer,
        database: Box<Cleanup>,
    },
    /// A private TLS Redis: killed (and its certificates deleted) on drop.
    TlsRedis(#[allow(dead_code)] tls::TlsRedis),
}

impl TestStore {
    /// A fresh SQLite file.
    pub async fn sqlite() -> TestStore {
        let dir =
            std::env::temp_dir().join(format!("conveyor-test-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir is writable");
        let url = format!("sqlite://{}", dir.join("jobs.db").display());
        let store = store::connect(&url, StoreOptions::default())
            .await
            .expect("a fresh SQLite file opens");
        TestStore {
            store,
            url,
            _cleanup: Cleanup::File(dir),
        }
    }

    /// A fresh Postgres database, or `None` (with the reason printed) when Postgres is not
    /// reachable outside CI.
    pub async fn postgres() -> Option<TestStore> {
        Self::postgres_with(&[], |url| url.to_string()).await
    }

    /// A fresh Postgres database reached over TLS (verify-full against the local server's
    /// certificate, see [`tls::pg_tls_url`]).
    pub async fn postgres_tls() -> Option<TestStore> {
        Self::postgres_with(&[], tls::pg_tls_url).await
    }

    /// A fresh Postgres database whose defaults are what a strict organisation sets:
    /// `serializable` isolation and short statement, lock and idle-in-transaction timeouts.
    /// Conveyor must set its own per connection and not inherit these.
    pub async fn postgres_strict() -> Option<TestStore> {
        Self::postgres_with(STRICT_DATABASE_SETTINGS, |url| url.to_string()).await
    }

    /// A fresh Postgres database with `ALTER DATABASE … SET` for each of `settings`, opened at
    /// `url(database url)`.
    pub async fn postgres_with(
        settings: &[&str],
        url: impl FnOnce(&str) -> String,
    ) -> Option<TestStore> {
        let admin_url = pg_admin_url();
        let mut admin = match sqlx::PgConnection::connect(&admin_url).await {
            Ok(c) => c,
            Err(e) => {
                return unavailable(&format!(
                    "Postgres at {admin_url} is unreachable ({e}); set CONVEYOR_TEST_PG_URL or start Postgres"
                ));
            }
        };
        let name = format!("conveyor_t_{}", uuid::Uuid::now_v7().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("the test role may create databases");
        for setting in settings {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER DATABASE {name} SET {setting}"
            )))
            .execute(&mut admin)
            .await
            .expect("the test role may alter its databases");
        }
        let _ = admin.close().await;
        let url = url(&replace_db(&admin_url, &name));
        // The guard exists before the store does, so a failed migration still drops the
        // database.
        let cleanup = Cleanup::Database { admin_url, name };
        let store = store::connect(
            &url,
            StoreOptions {
                max_connections: 8,
                ..StoreOptions::default()
            },
        )
        .await
        .expect("a fresh Postgres database migrates");
        analyze(&url).await;
        Some(TestStore {
            store,
            url,
            _cleanup: cleanup,
        })
    }

    /// A fresh Postgres database reached through a PgBouncer of its own in `mode` (session or
    /// transaction), the store told so with `?pooler=`; or `None` (with the reason printed)
    /// when Postgres or PgBouncer is missing outside CI.
    pub async fn pgbouncer(mode: Pooler) -> Option<TestStore> {
        let (bouncer, name, cleanup) = pooled_database(mode).await?;
        let url = bouncer.url(&name);
        let direct_url = replace_db(&pg_admin_url(), &name);
        let cleanup = Cleanup::Pooled {
            bouncer,
            database: Box::new(cleanup),
        };
        let store = store::connect(
            &url,
            StoreOptions {
                max_connections: 8,
                ..StoreOptions::default()
            },
        )
        .await
        .unwrap_or_else(|e| {
            panic!("a fresh Postgres database migrates through PgBouncer in {mode} mode: {e}")
        });
        analyze(&direct_url).await;
        Some(TestStore {
            store,
            url,
            _cleanup: cleanup,
        })
    }

    /// A fresh key prefix on Redis, or `None` (with the reason printed) when Redis is not
    /// reachable outside CI.
    pub async fn redis() -> Option<TestStore> {
        let server = redis_url();
        if let Err(e) = redis_reachable(&server).await {
            return unavailable(&format!(
                "Redis at {server} is unreachable ({e}); set CONVEYOR_TEST_REDIS_URL or start Redis"
            ));
        }
        let prefix = format!("conveyor_t_{}", uuid::Uuid::now_v7().simple());
        let sep = if server.contains('?') { '&' } else { '?' };
        let url = format!("{server}{sep}prefix={prefix}");
        let cleanup = Cleanup::Prefix {
            url: server,
            prefix,
        };
        let store = store::connect(&url, StoreOptions::default())
            .await
            .expect("a fresh Redis prefix opens");
        Some(TestStore {
            store,
            url,
            _cleanup: cleanup,
        })
    }

    /// A fresh store on a private `redis-server` that speaks only TLS, reached with
    /// `rediss://localhost:PORT/0?tls_ca_file=…`.
    pub async fn redis_tls() -> Option<TestStore> {
        let server = tls::TlsRedis::start(false).await?;
        let url = server.url(&[("tls_ca_file", &server.certs.path("ca.pem"))]);
        let store = store::connect(&url, StoreOptions::default())
            .await
            .expect("the TLS Redis opens");
        Some(TestStore {
            store,
            url,
            _cleanup: Cleanup::TlsRedis(server),
        })
    }

    /// Removes the file or drops the database (best effort). Dropping the `TestStore` does
    /// the same, so a test that panics cleans up too.
    pub async fn cleanup(self) {
        drop(self);
    }
}

/// A PgBouncer in `mode` and a fresh, empty database behind it (nothing migrated), with the
/// guard that drops the database; `None` (reason printed) when either is missing outside CI.
pub async fn pooled_database(mode: Pooler) -> Option<(pgbouncer::PgBouncer, String, Cleanup)> {
    let admin_url = pg_admin_url();
    let mut admin = match sqlx::PgConnection::connect(&admin_url).await {
        Ok(c) => c,
        Err(e) => {
            return unavailable(&format!(
                "Postgres at {admin_url} is unreachable ({e}); set CONVEYOR_TEST_PG_URL or start Postgres"
            ));
        }
    };
    let start = {
        let admin_url = admin_url.clone();
        tokio::task::spawn_blocking(move || pgbouncer::PgBouncer::start(mode, &admin_url))
    };
    let bouncer = match start
        .await
        .expect("the PgBouncer start task does not panic")
    {
        Ok(b) => b,
        Err(reason) => return unavailable(&reason),
    };
    let name = format!("conveyor_t_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("the test role may create databases");
    let _ = admin.close().await;
    let cleanup = Cleanup::Database {
        admin_url,
        name: name.clone(),
    };
    Some((bouncer, name, cleanup))
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        match self {
            Cleanup::Pooled { bouncer, .. } => {
                // Its server connections go with it; then `database` drops the database.
                bouncer.stop();
            }
            Cleanup::File(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Cleanup::Database { admin_url, name } => {
                // Drop may run inside the test's runtime (or while it unwinds), where blocking
                // on async work is not allowed: do it on a thread with a runtime of its own.
                let (admin_url, name) = (admin_url.clone(), name.clone());
                let _ = std::thread::spawn(move || {
                    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    else {
                        return;
                    };
                    rt.block_on(async {
                        if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            )))
                            .execute(&mut admin)
                            .await;
                        }
                    });
                })
                .join();
            }
            Cleanup::TlsRedis(_) => {}
            Cleanup::Prefix { url, prefix } => {
                let (url, prefix) = (url.clone(), prefix.clone());
                let _ = std::thread::spawn(move || {
                    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    else {
                        return;
                    };
                    rt.block_on(delete_prefix(&url, &prefix));
                })
                .join();
            }
        }
    }
}

/// The Redis server tests make their prefixes on.
pub fn redis_url() -> String {
    std::env::var("CONVEYOR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

async fn redis_reachable(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let ping = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(3), ping).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 3 s".into()),
    }
}

/// Every key a test's prefix made: the global ones (`prefix:…`) and the queues'
/// (`{prefix:queue}…`), found with `SCAN MATCH` (never `KEYS`).
pub async fn keys_with_prefix(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> redis::RedisResult<Vec<String>> {
    let mut out = Vec::new();
    for pattern in [format!("{prefix}:*"), format!("{{{prefix}:*")] {
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(conn)
                .await?;
            out.extend(keys);
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(out)
}

/// Deletes every key a test's prefix made (best effort).
async fn delete_prefix(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let Ok(keys) = keys_with_prefix(&mut conn, prefix).await else {
        return;
    };
    for batch in keys.chunks(1000) {
        let _ = redis::cmd("DEL")
            .arg(batch)
            .query_async::<()>(&mut conn)
            .await;
    }
}

/// A service a test needs is missing: fails under `CI=true`, else prints why the test is
/// skipped and returns `None` for the test to return early.
pub fn unavailable<T>(reason: &str) -> Option<T> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{reason} (under CI=true this is a failure, not a skip)");
    }
    eprintln!("skipping: {reason}");
    None
}

/// Runs ANALYZE on every Conveyor table of the database at `url`, as autovacuum does on its
/// own on every production server (it is off on some test machines). Run on a fresh database
/// it records statistics that say no job exists in any state: the point at which a plan that
/// trusts statistics goes wrong first, so the whole Postgres suite runs there.
pub async fn analyze(url: &str) {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .expect("the test database accepts a second connection");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname = 'conveyor'",
    )
    .fetch_all(&mut conn)
    .await
    .expect("the catalog lists Conveyor's tables");
    if !tables.is_empty() {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ANALYZE {}",
            tables.join(", ")
        )))
        .execute(&mut conn)
        .await
        .expect("ANALYZE runs on the test database");
    }
    let _ = conn.close().await;
}

/// The maintenance database URL tests create their databases from.
pub fn pg_admin_url() -> String {
    std::env::var("CONVEYOR_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `url` with its database name replaced.
pub fn replace_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let cut = base.rfind('/').map_or(base.len(), |i| i);
    let mut out = format!("{}/{db}", &base[..cut]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Polls `check` every 20 ms until it returns `Some`, failing after `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for: {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The keyring every webhook service of this test process seals secrets with: one key,
/// generated once per process, so two services on one store read each other's endpoints.
pub fn test_keyring() -> conveyor_worker::keyring::Keyring {
    static KEY: std::sync::OnceLock<conveyor_worker::keyring::Key> = std::sync::OnceLock::new();
    conveyor_worker::keyring::Keyring::new([KEY
        .get_or_init(conveyor_worker::keyring::Key::generate)
        .clone()])
}

/// What [`TestStore::postgres_strict`] sets on its database.
pub const STRICT_DATABASE_SETTINGS: &[&str] = &[
    "default_transaction_isolation = 'serializable'",
    "statement_timeout = '300ms'",
    "lock_timeout = '20ms'",
    "idle_in_transaction_session_timeout = '50ms'",
];

/// Generates, for each listed `async fn(Arc<dyn Store>)`, one `#[tokio::test]` per store
/// under production conditions: Postgres and Redis over TLS, and a Postgres database with
/// strict defaults ([`STRICT_DATABASE_SETTINGS`]).
#[macro_export]
macro_rules! production_backend_tests {
    ($($name:ident),* $(,)?) => {
        $crate::store_variant_tests!(postgres_tls, $crate::TestStore::postgres_tls(), $($name),*);
        $crate::store_variant_tests!(redis_tls, $crate::TestStore::redis_tls(), $($name),*);
        $crate::store_variant_tests!(
            postgres_strict,
            $crate::TestStore::postgres_strict(),
            $($name),*
        );
    };
}

/// One module `$module` of tests, each on the store `$make` (an expression whose future gives
/// `Option<TestStore>`: `None` when the backend is unavailable outside CI) makes.
#[doc(hidden)]
#[macro_export]
macro_rules! store_variant_tests {
    ($module:ident, $make:expr, $($name:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(t) = $make.await else { return };
                    super::$name(t.store.clone()).await;
                    t.cleanup().await;
                }
            )*
        }
    };
}

/// Generates one `#[tokio::test]` per backend for each listed `async fn(Arc<dyn Store>)`:
/// SQLite, Postgres, Redis, and Postgres through PgBouncer in transaction and session mode.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        $crate::store_variant_tests!(
            sqlite,
            async { Some($crate::TestStore::sqlite().await) },
            $($name),*
        );
        $crate::store_variant_tests!(postgres, $crate::TestStore::postgres(), $($name),*);
        $crate::store_variant_tests!(redis, $crate::TestStore::redis(), $($name),*);
        $crate::store_variant_tests!(
            pgbouncer_transaction,
            $crate::TestStore::pgbouncer(::conveyor_worker::store::Pooler::Transaction),
            $($name),*
        );
        $crate::store_variant_tests!(
            pgbouncer_session,
            $crate::TestStore::pgbouncer(::conveyor_worker::store::Pooler::Session),
            $($name),*
        );
    };
}
