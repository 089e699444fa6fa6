//! Postgres behind PgBouncer (session and transaction pooling), beyond the conformance and
//! runtime suites that `backend_tests!` already runs through it: migrations from an empty
//! database by several processes at once, a read-only start, LISTEN on a direct URL, and
//! pooler errors told as such.

use std::time::Duration;

use conveyor_tests::{TestStore, pooled_database};
use conveyor_worker::NewJob;
use conveyor_worker::store::{self, Pooler, StoreEvent, StoreOptions};
use serde_json::json;
use sqlx::Connection;

fn options() -> StoreOptions {
    StoreOptions {
        max_connections: 4,
        ..StoreOptions::default()
    }
}

/// Three stores (independent pools, as separate processes would have) open an empty
/// database through the pooler at the same moment: one applies the migrations under the
/// transaction-level lock, the others wait for it and find nothing to do.
async fn concurrent_migrations(mode: Pooler) {
    let Some((bouncer, name, _cleanup)) = pooled_database(mode).await else {
        return;
    };
    let url = bouncer.url(&name);
    let opened = futures::future::join_all((0..3).map(|_| store::connect(&url, options()))).await;
    let mut stores = Vec::new();
    for (i, s) in opened.into_iter().enumerate() {
        stores
            .push(s.unwrap_or_else(|e| panic!("store {i} opens through PgBouncer ({mode}): {e}")));
    }
    for s in &stores {
        s.ping().await.expect("the schema is current for everyone");
    }
    let direct = conveyor_tests::replace_db(&conveyor_tests::pg_admin_url(), &name);
    let mut conn = sqlx::PgConnection::connect(&direct).await.unwrap();
    let (rows, versions): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT version) FROM _sqlx_migrations WHERE success",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(rows >= 2, "every migration is recorded ({rows})");
    assert_eq!(rows, versions, "each migration is applied exactly once");
    // No advisory lock outlives the migration on any server connection.
    let locks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(locks, 0, "advisory locks left behind");

    // Work goes on through every store.
    let job = stores[0]
        .enqueue(NewJob::new("noop", json!({})))
        .await
        .unwrap();
    assert!(stores[2].get(job.id).await.unwrap().is_some());
    drop(stores);
    let _ = conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_from_empty_by_three_processes_through_transaction_pooling() {
    concurrent_migrations(Pooler::Transaction).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_from_empty_by_three_processes_through_session_pooling() {
    concurrent_migrations(Pooler::Session).await;
}

/// With nothing pending, opening the store writes nothing: it starts on a database whose
/// transactions are read-only (a replica, a full disk, a locked-down role).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_current_schema_is_checked_without_writing() {
    let Some(t) = TestStore::pgbouncer(Pooler::Transaction).await else {
        return;
    };
    let name = t
        .url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_string();
    let mut admin = sqlx::PgConnection::connect(&conveyor_tests::pg_admin_url())
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {name} SET default_transaction_read_only = on"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    // A direct connection opens new server sessions, which get the setting.
    let direct = conveyor_tests::replace_db(&conveyor_tests::pg_admin_url(), &name);
    let store = store::connect(&direct, options())
        .await
        .expect("a current schema opens without a write");
    store.ping().await.unwrap();
    assert!(
        store.enqueue(NewJob::new("noop", json!({}))).await.is_err(),
        "the database really is read-only"
    );
    drop(store);
    let _ = admin.close().await;
    t.cleanup().await;
}

/// Behind a transaction pooler, `database.listen_url` (a direct connection) carries LISTEN:
/// a job another process enqueues wakes this one at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_url_carries_wakeups_past_a_transaction_pooler() {
    let Some(t) = TestStore::pgbouncer(Pooler::Transaction).await else {
        return;
    };
    let name = t
        .url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_string();
    let direct = conveyor_tests::replace_db(&conveyor_tests::pg_admin_url(), &name);
    let listening = store::connect(
        &t.url,
        StoreOptions {
            listen_url: Some(direct),
            ..options()
        },
    )
    .await
    .unwrap();
    let mut events = listening.subscribe();
    // The LISTEN connection is up once a NOTIFY sent now arrives; until then, send again.
    let woke = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            t.store
                .enqueue(NewJob::new("noop", json!({})).queue("elsewhere"))
                .await
                .unwrap();
            let got = tokio::time::timeout(Duration::from_millis(200), async {
                loop {
                    match events.recv().await {
                        Ok(StoreEvent::JobsAvailable { queue }) if queue == "elsewhere" => {
                            return;
                        }
                        Ok(_) => continue,
                        Err(e) => panic!("event channel failed: {e}"),
                    }
                }
            })
            .await;
            if got.is_ok() {
                return;
            }
        }
    })
    .await;
    assert!(
        woke.is_ok(),
        "no wake-up through database.listen_url within 10 s"
    );
    drop(listening);
    t.cleanup().await;
}

/// A startup parameter PgBouncer does not know is reported as the pooler's refusal, with the
/// setting that fixes it, not as a database that is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_startup_parameter_is_a_pooler_error() {
    let Some((bouncer, name, _cleanup)) = pooled_database(Pooler::Session).await else {
        return;
    };
    let url = format!("{}&options=-c%20work_mem%3D8MB", bouncer.url(&name));
    let err = match store::connect(&url, options()).await {
        Ok(_) => panic!("PgBouncer accepted the `options` startup parameter"),
        Err(e) => e,
    };
    assert!(
        matches!(err, conveyor_worker::Error::Pooler(_)),
        "not a pooler error: {err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("ignore_startup_parameters") && text.contains("options"),
        "{text}"
    );
}

/// A transaction-mode pooler used without `pooler = "transaction"`: the named statement meets
/// a server connection that already has one of that name, and the error says which setting
/// to change. One server connection, already holding `sqlx_s_1` from another client, makes
/// the collision certain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unset_transaction_pooler_is_named_in_the_error() {
    use conveyor_tests::pgbouncer::PgBouncer;
    let Some((_, name, _cleanup)) = pooled_database(Pooler::Transaction).await else {
        return;
    };
    let admin_url = conveyor_tests::pg_admin_url();
    let bouncer = tokio::task::spawn_blocking(move || {
        PgBouncer::start_with_pool(Pooler::Transaction, &admin_url, 1)
    })
    .await
    .unwrap()
    .expect("a second PgBouncer starts");
    let options: sqlx::postgres::PgConnectOptions = bouncer.bare_url(&name).parse().unwrap();
    let mut other = sqlx::PgConnection::connect_with(&options.extra_float_digits(None))
        .await
        .unwrap();
    // A named statement, left on the only server connection.
    let _: i32 = sqlx::query_scalar("SELECT $1::int4")
        .bind(1)
        .fetch_one(&mut other)
        .await
        .unwrap();
    let err = match store::connect(&bouncer.bare_url(&name), options_for_one()).await {
        Ok(_) => panic!("named statements worked through a transaction pooler"),
        Err(e) => e,
    };
    assert!(
        matches!(err, conveyor_worker::Error::Pooler(_)),
        "not a pooler error: {err:?}"
    );
    assert!(
        err.to_string().contains("pooler = \"transaction\""),
        "{err}"
    );
    // Told, it works on the same pooler.
    let store = store::connect(&bouncer.url(&name), options_for_one())
        .await
        .expect("with the setting it opens");
    store.ping().await.unwrap();
    let _ = other.close().await;
}

fn options_for_one() -> StoreOptions {
    StoreOptions {
        max_connections: 2,
        ..StoreOptions::default()
    }
}

/// The URL and the setting must not disagree.
#[tokio::test]
async fn a_pooler_named_twice_differently_is_refused() {
    let err = match store::connect(
        "postgres://postgres@127.0.0.1:1/x?pooler=session",
        StoreOptions {
            pooler: Pooler::Transaction,
            ..options()
        },
    )
    .await
    {
        Ok(_) => panic!("conflicting pooler settings were accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("pooler=session") && err.contains("transaction"),
        "{err}"
    );
    let err = match store::connect(
        "postgres://postgres@127.0.0.1:1/x?pooler=statement",
        options(),
    )
    .await
    {
        Ok(_) => panic!("an unknown pooler mode was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("none") && err.contains("transaction"), "{err}");
}

/// The rule behind docs/decisions/0003, checked: through transaction pooling, sqlx's
/// unnamed statements (`persistent(false)`) go out in two round trips (Parse/Describe, then
/// Bind/Execute, each ending in Sync), and outside a transaction PgBouncer may hand the
/// second to another server connection, so a client can get another client's answer. Inside
/// `BEGIN … COMMIT` (what the store does in transaction mode) every answer is the client's
/// own. Eight clients each run their own statement (`$1 + i`) and check the answer; the
/// counts of both ways are printed (`-- --nocapture`), and the transaction's must be perfect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_statements_inside_a_transaction_always_get_their_own_answer() {
    use sqlx::postgres::PgConnectOptions;
    let Some((bouncer, name, _cleanup)) = pooled_database(Pooler::Transaction).await else {
        return;
    };
    let options: PgConnectOptions = bouncer.bare_url(&name).parse().unwrap();
    let options = options.extra_float_digits(None);
    const CLIENTS: i64 = 8;
    const STATEMENTS: i64 = 250;
    for in_transaction in [false, true] {
        let started = std::time::Instant::now();
        let runs = (0..CLIENTS).map(|i| {
            let options = options.clone();
            async move {
                let mut conn = sqlx::PgConnection::connect_with(&options).await.unwrap();
                let (mut ok, mut wrong, mut failed) = (0u32, 0u32, 0u32);
                for n in 0..STATEMENTS {
                    let sql = sqlx::AssertSqlSafe(format!("SELECT $1::int8 + {i}"));
                    let answer: Result<i64, sqlx::Error> = if in_transaction {
                        async {
                            let mut tx = conn.begin().await?;
                            let v = sqlx::query_scalar(sql)
                                .persistent(false)
                                .bind(n)
                                .fetch_one(&mut *tx)
                                .await?;
                            tx.commit().await?;
                            Ok(v)
                        }
                        .await
                    } else {
                        sqlx::query_scalar(sql)
                            .persistent(false)
                            .bind(n)
                            .fetch_one(&mut conn)
                            .await
                    };
                    match answer {
                        Ok(v) if v == n + i => ok += 1,
                        Ok(_) => wrong += 1,
                        Err(_) => {
                            failed += 1;
                            // A failed exchange can leave the connection unusable.
                            conn = sqlx::PgConnection::connect_with(&options).await.unwrap();
                        }
                    }
                }
                (ok, wrong, failed)
            }
        });
        let results = futures::future::join_all(runs).await;
        let (ok, wrong, failed) = results
            .iter()
            .fold((0, 0, 0), |a, r| (a.0 + r.0, a.1 + r.1, a.2 + r.2));
        println!(
            "in_transaction={in_transaction}: {ok} right, {wrong} answered by another client's statement, {failed} failed, {:.0} statements/s",
            (CLIENTS * STATEMENTS) as f64 / started.elapsed().as_secs_f64()
        );
        if in_transaction {
            assert_eq!(
                (wrong, failed),
                (0, 0),
                "inside a transaction every statement must get its own answer"
            );
        }
    }
}
