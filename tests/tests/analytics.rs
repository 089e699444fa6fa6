//! The application's rollups on real Postgres: a million generated events (and late arrivals)
//! rolled up window by window into a summary table equal to a direct `GROUP BY` over the raw
//! events; windows run twice — one after the other and at the same time — write the same rows;
//! a scheduled run aggregates again the windows within `lateness`; a query whose rows fall
//! outside their window is refused and leaves nothing behind; status says where it stands.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use conveyor_analytics::application::{AnalyticsConfig, Error, RollupConfig, Rollups};
use conveyor_tests::TestStore;
use sqlx::postgres::PgPool;

const EVENTS: i64 = 1_000_000;

/// One day of events, `EVENTS` of them evenly spread, on 50 pages.
pub const SCHEMA: &str = "
CREATE TABLE events (id bigserial PRIMARY KEY, at timestamptz NOT NULL, page int NOT NULL, amount int NOT NULL);
CREATE TABLE page_views (window_start timestamptz NOT NULL, page int NOT NULL, views bigint NOT NULL,
                         amount bigint NOT NULL, PRIMARY KEY (window_start, page))";

const QUERY: &str =
    "SELECT :window_start AS window_start, page, count(*) AS views, sum(amount) AS amount
                     FROM events WHERE at >= :window_start AND at < :window_end GROUP BY page";

/// Rows of the summary table that differ from a direct `GROUP BY` over the events (both ways),
/// for windows of `width` seconds starting before `until`.
async fn differences(pool: &PgPool, width: i64, until: DateTime<Utc>) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "WITH direct AS (
             SELECT date_bin('{width} seconds', at, timestamptz '1970-01-01 00:00:00+00') AS window_start,
                    page, count(*) AS views, sum(amount) AS amount
             FROM events WHERE at < $1 GROUP BY 1, 2),
         rolled AS (SELECT window_start, page, views, amount FROM page_views WHERE window_start < $1)
         SELECT count(*) FROM ((SELECT * FROM direct EXCEPT SELECT * FROM rolled)
                               UNION ALL (SELECT * FROM rolled EXCEPT SELECT * FROM direct)) d"
    )))
    .bind(until)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn generate(pool: &PgPool, from: DateTime<Utc>, count: i64, span_secs: i64) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(SCHEMA))
        .execute(pool)
        .await
        .unwrap();
    insert_events(pool, from, count, span_secs).await;
    sqlx::query("CREATE INDEX events_at ON events (at)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("ANALYZE events").execute(pool).await.unwrap();
}

/// `count` events spread over `span_secs` from `from`.
pub async fn insert_events(pool: &PgPool, from: DateTime<Utc>, count: i64, span_secs: i64) {
    sqlx::query(
        "INSERT INTO events (at, page, amount)
         SELECT $1 + (i * $3::float8 / $2) * interval '1 second', i % 50, i % 97
         FROM generate_series(0, $2 - 1) AS i",
    )
    .bind(from)
    .bind(count)
    .bind(span_secs as f64)
    .execute(pool)
    .await
    .unwrap();
}

fn rollup(url: &str, query: &str, window: u64, lateness: u64) -> RollupConfig {
    RollupConfig {
        database: url.into(),
        query: query.into(),
        target: "page_views".into(),
        window_column: "window_start".into(),
        window: Duration::from_secs(window),
        lateness: Duration::from_secs(lateness),
        schedule: "* * * * *".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_events_roll_up_to_a_direct_group_by_once_per_window() {
    let Some(t) = TestStore::postgres().await else {
        return;
    };
    let pool = PgPool::connect(&t.url).await.unwrap();
    let day = DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    generate(&pool, day, EVENTS, 86_400).await;

    let mut config = AnalyticsConfig::default();
    config
        .rollups
        .insert("views".into(), rollup(&t.url, QUERY, 3600, 2 * 3600));
    config.rollups.insert(
        "misplaced".into(),
        rollup(
            &t.url,
            &QUERY.replacen(
                ":window_start AS",
                "(:window_start - interval '1 year') AS",
                1,
            ),
            3600,
            0,
        ),
    );
    let mut fresh = rollup(&t.url, QUERY, 3600, 0);
    fresh.target = "page_views_fresh".into();
    config.rollups.insert("fresh".into(), fresh);
    sqlx::query("CREATE TABLE page_views_fresh (LIKE page_views INCLUDING ALL)")
        .execute(&pool)
        .await
        .unwrap();
    let urls: BTreeMap<String, String> = config
        .rollups
        .keys()
        .map(|k| (k.clone(), t.url.clone()))
        .collect();
    let rollups = Arc::new(Rollups::new(config, urls, t.store.clone()));

    // Every window of the day, two at a time; window 3 also twice at the same moment.
    let hour = TimeDelta::hours(1);
    let mut runs = tokio::task::JoinSet::new();
    for (i, extra) in (0..24).map(|i| (i, i == 3)) {
        for _ in 0..(1 + extra as usize) {
            let r = rollups.clone();
            runs.spawn(async move { r.run_window("views", day + hour * i).await });
        }
    }
    let mut written = 0;
    while let Some(report) = runs.join_next().await {
        let report = report.unwrap().unwrap();
        assert_eq!(report.rows, 50, "{report:?}");
        written += 1;
    }
    assert_eq!(written, 25);
    assert_eq!(differences(&pool, 3600, day + TimeDelta::days(1)).await, 0);
    let total: i64 = sqlx::query_scalar("SELECT sum(views)::bigint FROM page_views")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(total, EVENTS, "every event counted once");
    let runs3: i32 = sqlx::query_scalar(
        "SELECT runs FROM conveyor_rollup_windows WHERE name = 'views' AND window_start = $1",
    )
    .bind(day + hour * 3)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        runs3, 2,
        "the duplicate ran, and replaced rather than added"
    );

    // Late arrivals in the last two hours, then the schedule's run half an hour after the
    // day: it aggregates again the windows within `lateness` (2 h) of the watermark.
    insert_events(&pool, day + hour * 22, 20_000, 2 * 3600).await;
    assert!(differences(&pool, 3600, day + TimeDelta::days(1)).await > 0);
    let now = day + TimeDelta::days(1) + TimeDelta::minutes(30);
    let report = rollups.run_scheduled("views", now).await.unwrap();
    assert_eq!(
        (report.from, report.to, report.windows),
        (day + hour * 22, day + hour * 24, 2),
        "{report:?}"
    );
    assert_eq!(differences(&pool, 3600, day + TimeDelta::days(1)).await, 0);
    // Run again at the same instant: the same rows.
    rollups.run_scheduled("views", now).await.unwrap();
    assert_eq!(differences(&pool, 3600, day + TimeDelta::days(1)).await, 0);

    let status = rollups.status("views").await.unwrap();
    assert_eq!(
        status.watermark,
        Some(day + TimeDelta::days(1)),
        "{status:?}"
    );
    assert_eq!(status.windows_done, 24, "{status:?}");
    assert_eq!(status.windows_missing, 0, "{status:?}");
    assert_eq!(status.last_error, None, "{status:?}");

    // Rows outside their window: refused, the transaction rolled back, the error recorded.
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM page_views")
        .fetch_one(&pool)
        .await
        .unwrap();
    let e = rollups
        .run_window("misplaced", day + hour * 5)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Query { .. }), "{e}");
    assert!(e.to_string().contains("outside"), "{e}");
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM page_views")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(before, after, "nothing of the refused window is left");
    let status = rollups.status("misplaced").await.unwrap();
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("outside"),
        "{status:?}"
    );
    assert_eq!(status.windows_done, 0, "{status:?}");

    // A new rollup's first scheduled run writes the last complete window; the next ones
    // the windows completed since (no lateness here).
    let first = rollups
        .run_scheduled("fresh", day + hour * 10 + TimeDelta::minutes(30))
        .await
        .unwrap();
    assert_eq!(
        (first.from, first.windows),
        (day + hour * 9, 1),
        "{first:?}"
    );
    let next = rollups
        .run_scheduled("fresh", day + hour * 12 + TimeDelta::minutes(10))
        .await
        .unwrap();
    assert_eq!((next.from, next.windows), (day + hour * 10, 2), "{next:?}");

    // A window off the grid, a rollup not configured: bad input.
    let e = rollups
        .run_window("views", day + TimeDelta::minutes(5))
        .await
        .unwrap_err();
    assert!(
        e.is_bad_input() && e.to_string().contains("not the start of a window"),
        "{e}"
    );
    let e = rollups.run_window("nope", day).await.unwrap_err();
    assert!(
        e.is_bad_input() && e.to_string().contains("[analytics.rollups.nope]"),
        "{e}"
    );
    pool.close().await;
}
