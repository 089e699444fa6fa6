//! The plans of the Postgres store's hot statements, with statistics as autovacuum leaves
//! them. Each statement is EXPLAINed exactly as the store sends it (the consts of
//! `store::postgres::queries`), both as a custom plan (the arguments known, as for a
//! statement's first runs on a connection) and as a generic one (what a prepared statement
//! settles on), at the points where stale statistics mislead a planner most:
//!
//! 1. statistics of the empty table (ANALYZE before any job, then 20,000 enqueued);
//! 2. ANALYZE while no job runs, then a batch claimed;
//! 3. ANALYZE mid-run, with a batch running;
//! 4. ANALYZE after 100,000 finished jobs were added in bulk.
//!
//! The completion with results and the progress report are checked like the rest.
//!
//! At each, every statement must reach the table only through the index made for it (rows
//! known by id: the primary key) and never read the table through a sequential scan. Before
//! these statements were shaped for it, point 2 made the completion read the whole
//! running-jobs index for every batch (37,000 jobs/s fell to 1,000).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_tests::{TestStore, analyze, eventually};
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::store::postgres::queries;
use conveyor_worker::store::{FetchRequest, JobFilter};
use conveyor_worker::{JobContext, JobState, NewJob, Outcome, Registry, Store};
use serde_json::Value;
use sqlx::postgres::PgArguments;
use sqlx::{Arguments, Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const QUEUE: &str = "plans";
const WORKER: &str = "plans-test";
const BATCH: i64 = 200;

/// A hot statement, the indexes its plan may read `jobs` through, and its arguments.
struct Hot {
    name: &'static str,
    sql: &'static str,
    indexes: &'static [&'static str],
}

const HOT: &[Hot] = &[
    Hot {
        name: "fetch",
        sql: queries::FETCH,
        indexes: &["jobs_fetch", "jobs_pkey"],
    },
    Hot {
        name: "completion",
        sql: queries::FINISH,
        indexes: &["jobs_pkey"],
    },
    Hot {
        name: "completion with results",
        sql: queries::FINISH_WITH_RESULTS,
        indexes: &["jobs_pkey"],
    },
    Hot {
        name: "progress",
        sql: queries::REPORT_PROGRESS,
        indexes: &["jobs_pkey"],
    },
    Hot {
        name: "heartbeat",
        sql: queries::HEARTBEAT,
        indexes: &["jobs_lease_owner", "jobs_pkey"],
    },
    Hot {
        name: "rescue",
        sql: queries::RESCUE_EXPIRED,
        indexes: &["jobs_lease_expiry"],
    },
    Hot {
        name: "promotion",
        sql: queries::PROMOTE_DUE,
        indexes: &["jobs_due", "jobs_pkey"],
    },
    Hot {
        name: "prune",
        sql: queries::PRUNE,
        indexes: &["jobs_finalized", "jobs_pkey"],
    },
    Hot {
        name: "enqueue",
        sql: queries::ENQUEUE,
        indexes: &[],
    },
];

/// The arguments the store would send for `name`, with `running` the jobs a worker holds.
fn arguments(name: &str, running: &[Uuid], now: DateTime<Utc>) -> PgArguments {
    let mut a = PgArguments::default();
    let lease = sqlx::postgres::types::PgInterval {
        months: 0,
        days: 0,
        microseconds: 30_000_000,
    };
    let day = chrono::Duration::days(1);
    let n = running.len();
    let r = match name {
        "fetch" => (|| {
            a.add(QUEUE)?;
            a.add(BATCH)?;
            a.add(WORKER)?;
            a.add(lease)
        })(),
        "completion" => (|| {
            a.add(running.to_vec())?;
            a.add(vec![1i32; n])?;
            a.add(vec!["completed"; n])?;
            a.add(vec![None::<DateTime<Utc>>; n])?;
            a.add(vec![Some(now); n])?;
            a.add(vec![0i32; n])?;
            a.add(vec!["{}"; n])?;
            a.add("plans-origin")
        })(),
        "completion with results" => (|| {
            a.add(running.to_vec())?;
            a.add(vec![1i32; n])?;
            a.add(vec!["completed"; n])?;
            a.add(vec![None::<DateTime<Utc>>; n])?;
            a.add(vec![Some(now); n])?;
            a.add(vec![0i32; n])?;
            a.add(vec!["{}"; n])?;
            a.add(vec![Some(r#"{"total":1}"#); n])?;
            a.add("plans-origin")
        })(),
        "progress" => (|| {
            a.add(running.first().copied().unwrap_or_else(Uuid::now_v7))?;
            a.add(r#"{"attempt":1,"percent":50.0,"updated_at":"2026-01-01T00:00:00Z"}"#)?;
            a.add(1i32)
        })(),
        "heartbeat" => (|| {
            a.add(lease)?;
            a.add(WORKER)?;
            a.add(running.to_vec())
        })(),
        "rescue" | "promotion" => (|| {
            a.add(now)?;
            a.add(1000i64)
        })(),
        "prune" => (|| {
            a.add(now - day)?;
            a.add(now - day * 7)?;
            a.add(now - day * 7)?;
            a.add(now - day)?;
            a.add(1000i64)
        })(),
        "enqueue" => (|| {
            let k = 100;
            a.add((0..k).map(|_| Uuid::now_v7()).collect::<Vec<_>>())?;
            a.add(vec![QUEUE; k])?;
            a.add(vec!["plans.noop"; k])?;
            a.add(vec!["{}"; k])?;
            a.add(vec![0i16; k])?;
            a.add(vec![0i64; k])?;
            a.add(vec![20i32; k])?;
            a.add(vec![None::<DateTime<Utc>>; k])?;
            a.add(
                (0..k)
                    .map(|i| format!("plans-explain-{i}"))
                    .collect::<Vec<_>>(),
            )?;
            a.add(vec!["[]"; k])?;
            a.add(vec!["{}"; k])?;
            a.add("plans-origin")
        })(),
        other => panic!("no arguments for {other}"),
    };
    r.expect("test arguments encode");
    a
}

/// The statement's plan, as a custom plan (arguments known) or a generic one.
async fn explain(conn: &mut PgConnection, hot: &Hot, generic: bool, running: &[Uuid]) -> Value {
    let plan: sqlx::types::Json<Value> = if generic {
        sqlx::query("SET plan_cache_mode = force_generic_plan")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("PREPARE hot AS {}", hot.sql)))
            .execute(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("{} prepares: {e}", hot.name));
        let n = hot
            .sql
            .match_indices('$')
            .filter_map(|(i, _)| {
                hot.sql[i + 1..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .unwrap_or(0);
        // A generic plan does not look at the values: NULLs do.
        let nulls = vec!["NULL"; n].join(", ");
        let plan = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (FORMAT JSON) EXECUTE hot({nulls})"
        )))
        .fetch_one(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{} explains: {e}", hot.name));
        for reset in ["DEALLOCATE hot", "RESET plan_cache_mode"] {
            sqlx::query(reset).execute(&mut *conn).await.unwrap();
        }
        plan
    } else {
        let args = arguments(hot.name, running, Utc::now());
        sqlx::query_scalar_with(
            sqlx::AssertSqlSafe(format!("EXPLAIN (FORMAT JSON) {}", hot.sql)),
            args,
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{} explains: {e}", hot.name))
    };
    plan.0[0]["Plan"].clone()
}

/// What is wrong with `plan` for `hot`, one line per problem.
fn problems(hot: &Hot, plan: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let allowed: BTreeSet<&str> = hot.indexes.iter().copied().collect();
    walk(plan, &mut |node| {
        let kind = node["Node Type"].as_str().unwrap_or("");
        let relation = node["Relation Name"].as_str();
        let index = node["Index Name"].as_str();
        if relation == Some("jobs") && kind == "Seq Scan" {
            out.insert("reads the whole table (Seq Scan on jobs)".to_string());
        }
        if let Some(index) = index
            && index.starts_with("jobs_")
            && !allowed.contains(index)
        {
            out.insert(format!("reads jobs through {index} ({kind})"));
        }
        if kind == "Nested Loop" && node["Plans"][1]["Node Type"].as_str() == Some("Function Scan")
        {
            out.insert(
                "re-reads the batch's arrays once per job (Nested Loop over a Function Scan)"
                    .into(),
            );
        }
    });
    out
}

fn walk(node: &Value, f: &mut impl FnMut(&Value)) {
    f(node);
    if let Some(children) = node["Plans"].as_array() {
        for c in children {
            walk(c, f);
        }
    }
}

/// One line per node: type, relation, index.
fn outline(node: &Value) -> String {
    let mut lines = Vec::new();
    walk(node, &mut |n| {
        lines.push(format!(
            "{} {} {}",
            n["Node Type"].as_str().unwrap_or("?"),
            n["Relation Name"].as_str().unwrap_or(""),
            n["Index Name"].as_str().unwrap_or("")
        ))
    });
    lines.join(" / ")
}

/// Every hot statement in both plan modes; problems are collected into `found`.
async fn check_all(
    conn: &mut PgConnection,
    point: &str,
    running: &[Uuid],
    found: &mut Vec<String>,
) {
    for hot in HOT {
        for generic in [false, true] {
            let plan = explain(conn, hot, generic, running).await;
            for p in problems(hot, &plan) {
                found.push(format!(
                    "{point}, {} plan of the {}: {p}\n    plan: {}",
                    if generic { "generic" } else { "custom" },
                    hot.name,
                    outline(&plan)
                ));
            }
        }
    }
}

async fn claim(s: &Arc<dyn Store>) -> Vec<Uuid> {
    s.fetch(FetchRequest {
        queue: QUEUE,
        limit: BATCH as u32,
        worker: WORKER,
        lease: Duration::from_secs(30),
    })
    .await
    .expect("fetch works")
    .into_iter()
    .map(|j| j.id.0)
    .collect()
}

async fn bulk_insert(conn: &mut PgConnection, n: i64, state: &str, queue: &str) {
    sqlx::query(
        "INSERT INTO conveyor.jobs (id, queue, kind, args, state, attempt, max_attempts, run_at, \
         created_at, attempted_at, finalized_at) \
         SELECT conveyor.uuid_v7(), $2, 'plans.noop', '{}', $3, \
           CASE WHEN $3 = 'completed' THEN 1 ELSE 0 END, 20, now(), now(), \
           CASE WHEN $3 = 'completed' THEN now() END, CASE WHEN $3 = 'completed' THEN now() END \
         FROM generate_series(1, $1)",
    )
    .bind(n)
    .bind(queue)
    .bind(state)
    .execute(conn)
    .await
    .expect("bulk insert works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_statements_keep_their_plans_whatever_the_statistics_say() {
    let Some(t) = TestStore::postgres().await else {
        return;
    };
    let s = t.store.clone();
    let mut conn = PgConnection::connect(&t.url)
        .await
        .expect("a second connection to the test database opens");
    let mut found = Vec::new();

    // 1. The harness analyzed the empty table; now 20,000 jobs wait and a batch runs.
    bulk_insert(&mut conn, 20_000, "available", QUEUE).await;
    let running = claim(&s).await;
    assert_eq!(running.len(), BATCH as usize);
    check_all(
        &mut conn,
        "statistics of the empty table",
        &running,
        &mut found,
    )
    .await;

    // 2. ANALYZE while nothing runs (after a few batches went through), then a batch runs.
    let done: Vec<_> = running.iter().map(|&id| finish_done(id)).collect();
    assert_eq!(s.finish(done).await.unwrap(), BATCH as u64);
    analyze(&t.url).await;
    let running = claim(&s).await;
    check_all(
        &mut conn,
        "ANALYZE with no job running",
        &running,
        &mut found,
    )
    .await;

    // 3. ANALYZE mid-run.
    analyze(&t.url).await;
    check_all(&mut conn, "ANALYZE mid-run", &running, &mut found).await;

    // 4. 100,000 finished jobs, vacuumed and analyzed as autovacuum would.
    bulk_insert(&mut conn, 100_000, "completed", "plans_done").await;
    sqlx::query("VACUUM ANALYZE conveyor.jobs")
        .execute(&mut conn)
        .await
        .expect("VACUUM ANALYZE runs");
    check_all(&mut conn, "100,000 finished jobs", &running, &mut found).await;

    assert!(
        found.is_empty(),
        "{} hot-statement plans depend on the statistics:\n{}",
        found.len(),
        found.join("\n")
    );
}

fn finish_done(id: Uuid) -> conveyor_worker::store::Finish {
    let now = Utc::now();
    conveyor_worker::store::Finish {
        id: conveyor_worker::JobId(id),
        attempt: 1,
        state: JobState::Completed,
        run_at: None,
        attempt_delta: 0,
        record: conveyor_worker::AttemptRecord {
            attempt: 1,
            started_at: now,
            finished_at: now,
            outcome: conveyor_worker::AttemptOutcome::Completed,
            error: None,
            causes: Vec::new(),
            worker: Some(WORKER.into()),
            duration_ms: 0,
            traceback: None,
        },
        result: None,
    }
}

/// The worker runtime processes a batch at full speed after an ANALYZE that saw no job
/// running (the point that used to cost 36× in throughput).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_processes_a_batch_after_analyze() {
    let Some(t) = TestStore::postgres().await else {
        return;
    };
    let s = t.store.clone();
    let n = 3000;
    let jobs: Vec<NewJob> = (0..n)
        .map(|i| NewJob::new("plans.noop", serde_json::json!({ "i": i })).queue(QUEUE))
        .collect();
    s.enqueue_many(jobs).await.unwrap();
    analyze(&t.url).await;

    let ran = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    let r = ran.clone();
    registry.register("plans.noop", move |_: Value, _ctx: JobContext| {
        r.fetch_add(1, Ordering::Relaxed);
        async { Ok(Outcome::Done) }
    });
    let config = WorkerConfig {
        queues: vec![QueueConfig {
            name: QUEUE.into(),
            concurrency: 256,
        }],
        fetch_batch: 200,
        poll_interval: Duration::from_millis(100),
        ..WorkerConfig::default()
    };
    let shutdown = CancellationToken::new();
    let worker = Worker::new(s.clone(), registry, config).expect("valid config");
    let handle = tokio::spawn(worker.run(shutdown.clone()));
    let completed = JobFilter {
        queue: Some(QUEUE.into()),
        states: vec![JobState::Completed],
        ..JobFilter::default()
    };
    eventually(20, "every job of the batch to complete", || {
        let s = s.clone();
        let completed = completed.clone();
        async move { (s.count(&completed).await.ok()? == n).then_some(()) }
    })
    .await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    assert_eq!(ran.load(Ordering::Relaxed), n as usize);
}
