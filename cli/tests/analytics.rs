//! The application's rollups through the real binary on real Postgres: a million generated
//! events, a backfill that stopped after half its windows, a `conveyor worker` killed with
//! SIGKILL in the middle of running it, the backfill run again over the whole period (only
//! the missing windows enqueued) and a new worker: the summary table equals a direct
//! `GROUP BY` over the events — nothing lost, nothing counted twice — and `conveyor analytics
//! status` says so. An unknown rollup is refused naming the config table to declare.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use common::{Process, conveyor, run, run_json};
use conveyor_tests::{TestStore, eventually};
use serde_json::Value;
use sqlx::postgres::PgPool;

const EVENTS: i64 = 1_000_000;

async fn differences(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "WITH direct AS (
             SELECT date_bin('10 minutes', at, timestamptz '1970-01-01 00:00:00+00') AS window_start,
                    page, count(*) AS views, sum(amount) AS amount
             FROM events GROUP BY 1, 2),
         rolled AS (SELECT window_start, page, views, amount FROM page_views)
         SELECT count(*) FROM ((SELECT * FROM direct EXCEPT SELECT * FROM rolled)
                               UNION ALL (SELECT * FROM rolled EXCEPT SELECT * FROM direct)) d",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn windows_done(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM conveyor_rollup_windows WHERE name = 'views'")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

fn config_file(url: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "conveyor-analytics-{}.toml",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::write(
        &path,
        format!(
            r#"
[analytics.rollups.views]
database = "{url}"
query = """
  SELECT :window_start AS window_start, page, count(*) AS views, sum(amount) AS amount
  FROM events WHERE at >= :window_start AND at < :window_end GROUP BY page"""
target = "page_views"
window = "10m"
schedule = "0 0 1 1 *"   # the backfill alone writes windows here
"#
        ),
    )
    .unwrap();
    path
}

fn with_config(args: &[&str], config: &std::path::Path) -> Vec<String> {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.push("--config".into());
    all.push(config.display().to_string());
    all
}

fn worker(url: &str, config: &std::path::Path) -> Process {
    let mut c = conveyor(url, &["worker", "--config", &config.display().to_string()]);
    c.env("CONVEYOR_WORKER__LEASE", "2s")
        .env("CONVEYOR_WORKER__HEARTBEAT", "500ms")
        .env("CONVEYOR_WORKER__POLL_INTERVAL", "100ms")
        .env("CONVEYOR_MAINTENANCE__RESCUER__INTERVAL", "200ms")
        .env("CONVEYOR_MAINTENANCE__RESCUER__RETRY__BASE", "100ms")
        .env("CONVEYOR_MAINTENANCE__RESCUER__RETRY__JITTER", "0");
    Process::spawn(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_survives_a_killed_worker_and_counts_each_event_once() {
    let Some(t) = TestStore::postgres().await else {
        return;
    };
    let url = t.url.clone();
    let pool = PgPool::connect(&url).await.unwrap();
    let today = Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let day: DateTime<Utc> = today - TimeDelta::days(2);
    sqlx::raw_sql(
        "CREATE TABLE events (id bigserial PRIMARY KEY, at timestamptz NOT NULL, page int NOT NULL, amount int NOT NULL);
         CREATE TABLE page_views (window_start timestamptz NOT NULL, page int NOT NULL, views bigint NOT NULL,
                                  amount bigint NOT NULL, PRIMARY KEY (window_start, page))",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO events (at, page, amount)
         SELECT $1 + (i * 86400.0 / $2) * interval '1 second', i % 50, i % 97
         FROM generate_series(0, $2 - 1) AS i",
    )
    .bind(day)
    .bind(EVENTS)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::raw_sql("CREATE INDEX ON events (at); ANALYZE events")
        .execute(&pool)
        .await
        .unwrap();
    let config = config_file(&url);
    let at = |t: DateTime<Utc>| t.to_rfc3339();

    // A backfill that got through half the day before it stopped.
    let args = with_config(
        &[
            "analytics",
            "backfill",
            "views",
            "--from",
            &at(day),
            "--to",
            &at(day + TimeDelta::hours(12)),
        ],
        &config,
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = run_json(&url, &args);
    assert_eq!(
        (first["windows"].as_u64(), first["enqueued"].as_u64()),
        (Some(72), Some(72)),
        "{first}"
    );

    // A worker runs some windows and is killed with SIGKILL in the middle.
    let mut w = worker(&url, &config);
    let started = std::time::Instant::now();
    while windows_done(&pool).await < 5 {
        assert!(
            w.child.try_wait().unwrap().is_none(),
            "the worker exited: {:?}",
            w.seen
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no window was written"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    w.child.kill().unwrap(); // SIGKILL
    w.child.wait().unwrap();
    let done_at_kill = windows_done(&pool).await;
    assert!(
        done_at_kill < 72,
        "the worker finished every window before it could be killed: make the windows larger"
    );

    // The backfill again, over the whole day: only what is missing is enqueued.
    let args = with_config(
        &[
            "analytics",
            "backfill",
            "views",
            "--from",
            &at(day),
            "--to",
            &at(day + TimeDelta::days(1)),
        ],
        &config,
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let again = run_json(&url, &args);
    assert_eq!(again["windows"], 144, "{again}");
    assert_eq!(again["done"].as_i64(), Some(done_at_kill), "{again}");
    assert_eq!(again["enqueued"], 72, "{again}");
    assert_eq!(
        again["already_enqueued"].as_i64(),
        Some(72 - done_at_kill),
        "the killed worker's windows are still held by their keys: {again}"
    );

    // A new worker finishes them, the killed worker's jobs rescued when their leases expire.
    let _w = worker(&url, &config);
    let status_args = with_config(&["analytics", "status", "views"], &config);
    let status_args: Vec<&str> = status_args.iter().map(String::as_str).collect();
    let status: Value = eventually(90, "every window written", || {
        let url = url.clone();
        let status_args = status_args.clone();
        async move {
            let s = run_json(&url, &status_args);
            (s["windows_done"] == 144 && s["jobs_pending"] == 0).then_some(s)
        }
    })
    .await;
    assert_eq!(status["windows_missing"], 0, "{status}");
    assert_eq!(status["jobs_dead"], 0, "{status}");
    assert_eq!(status["last_error"], Value::Null, "{status}");
    assert_eq!(
        status["watermark"]
            .as_str()
            .map(|s| s.parse::<DateTime<Utc>>().unwrap()),
        Some(day + TimeDelta::days(1)),
        "{status}"
    );
    assert_eq!(
        differences(&pool).await,
        0,
        "the rollup equals a direct GROUP BY"
    );
    let total: i64 = sqlx::query_scalar("SELECT sum(views)::bigint FROM page_views")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(total, EVENTS, "every event counted once");
    let (code, out, err) = run(&url, &status_args);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("windows done  144"), "{out}");

    // A rollup that is not declared: bad input, naming where to declare it.
    let args = with_config(&["analytics", "status", "clicks"], &config);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = run(&url, &args);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("[analytics.rollups.clicks]"), "{err}");
    pool.close().await;
    let _ = std::fs::remove_file(config);
}
