//! [`MetaStore`] on Postgres: `conveyor.meta` and `conveyor.rate_buckets` (migration 0002).
//! Each write is one statement whose guard is the expectation, so concurrent writers never
//! both win; token buckets lock their row for the read-compute-write.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder, Row};

use super::{PgStore, after};
use crate::error::Result;
use crate::store::meta::{
    Expect, IDLE_BUCKET, MetaQuery, MetaStore, Put, RateLimit, Record, TokenTake, bucket_take,
    check_names, check_query, check_rate, conflict, sql_direction,
};

fn record(row: &PgRow) -> Result<Record> {
    Ok(Record {
        collection: row.try_get("collection")?,
        key: row.try_get("key")?,
        value: row.try_get("value")?,
        version: row.try_get("version")?,
        updated_at: row.try_get("updated_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}

/// Microsecond precision, as the database keeps it.
fn trunc(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

impl PgStore {
    async fn live_version(&self, collection: &str, key: &str) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT version FROM conveyor.meta WHERE collection = $1 AND key = $2 \
             AND (expires_at IS NULL OR expires_at > now())",
        )
        .bind(collection)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?)
    }
}

#[async_trait]
impl MetaStore for PgStore {
    async fn meta_get(&self, collection: &str, key: &str) -> Result<Option<Record>> {
        check_names(collection, key)?;
        let row = sqlx::query(
            "SELECT * FROM conveyor.meta WHERE collection = $1 AND key = $2 \
             AND (expires_at IS NULL OR expires_at > $3)",
        )
        .bind(collection)
        .bind(key)
        .bind(self.clock_now().await?)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(record).transpose()
    }

    async fn meta_put(&self, put: Put<'_>) -> Result<Record> {
        check_names(put.collection, put.key)?;
        let now = trunc(self.clock_now().await?);
        let expires_at = put.ttl.map(|t| trunc(after(now, t)));
        // An expired row counts as absent: it is replaced with version 1.
        let sql = match put.expect {
            Expect::Any => {
                "INSERT INTO conveyor.meta AS m (collection, key, value, version, updated_at, expires_at) \
                 VALUES ($1, $2, $3, 1, $4, $5) \
                 ON CONFLICT (collection, key) DO UPDATE SET value = excluded.value, \
                   version = CASE WHEN m.expires_at IS NOT NULL AND m.expires_at <= $4 THEN 1 \
                                  ELSE m.version + 1 END, \
                   updated_at = excluded.updated_at, expires_at = excluded.expires_at \
                 RETURNING version"
            }
            Expect::Absent => {
                "INSERT INTO conveyor.meta AS m (collection, key, value, version, updated_at, expires_at) \
                 VALUES ($1, $2, $3, 1, $4, $5) \
                 ON CONFLICT (collection, key) DO UPDATE SET value = excluded.value, version = 1, \
                   updated_at = excluded.updated_at, expires_at = excluded.expires_at \
                 WHERE m.expires_at IS NOT NULL AND m.expires_at <= $4 \
                 RETURNING version"
            }
            Expect::Version(_) => {
                "UPDATE conveyor.meta SET value = $3, version = version + 1, updated_at = $4, \
                   expires_at = $5 \
                 WHERE collection = $1 AND key = $2 AND version = $6 \
                   AND (expires_at IS NULL OR expires_at > $4) \
                 RETURNING version"
            }
        };
        let expected = match put.expect {
            Expect::Version(v) => v,
            _ => 0,
        };
        let version: Option<i64> = sqlx::query_scalar(sql)
            .bind(put.collection)
            .bind(put.key)
            .bind(put.value)
            .bind(now)
            .bind(expires_at)
            .bind(expected)
            .fetch_optional(&self.pool)
            .await?;
        let Some(version) = version else {
            let found = self.live_version(put.collection, put.key).await?;
            return Err(conflict(put.collection, put.key, put.expect, found));
        };
        Ok(Record {
            collection: put.collection.to_string(),
            key: put.key.to_string(),
            value: put.value.clone(),
            version,
            updated_at: now,
            expires_at,
        })
    }

    async fn meta_put_many(&self, puts: &[Put<'_>]) -> Result<Vec<Record>> {
        let unconditional = puts.iter().all(|p| p.expect == Expect::Any);
        let distinct = puts
            .iter()
            .map(|p| (p.collection, p.key))
            .collect::<std::collections::HashSet<_>>()
            .len()
            == puts.len();
        if puts.len() < 2 || !unconditional || !distinct {
            let mut out = Vec::with_capacity(puts.len());
            for put in puts {
                out.push(self.meta_put(put.clone()).await?);
            }
            return Ok(out);
        }
        for put in puts {
            check_names(put.collection, put.key)?;
        }
        let now = trunc(self.clock_now().await?);
        let expires: Vec<Option<DateTime<Utc>>> = puts
            .iter()
            .map(|p| p.ttl.map(|t| trunc(after(now, t))))
            .collect();
        let values: Vec<String> = puts
            .iter()
            .map(|p| serde_json::to_string(p.value))
            .collect::<std::result::Result<_, _>>()?;
        // One statement; an expired row counts as absent (version 1 again), as in meta_put.
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "INSERT INTO conveyor.meta AS m (collection, key, value, version, updated_at, expires_at) \
             SELECT c, k, v::jsonb, 1, $4, e \
             FROM unnest($1::text[], $2::text[], $3::text[], $5::timestamptz[]) AS t(c, k, v, e) \
             ON CONFLICT (collection, key) DO UPDATE SET value = excluded.value, \
               version = CASE WHEN m.expires_at IS NOT NULL AND m.expires_at <= $4 THEN 1 \
                              ELSE m.version + 1 END, \
               updated_at = excluded.updated_at, expires_at = excluded.expires_at \
             RETURNING collection, key, version",
        )
        .bind(puts.iter().map(|p| p.collection).collect::<Vec<_>>())
        .bind(puts.iter().map(|p| p.key).collect::<Vec<_>>())
        .bind(&values)
        .bind(now)
        .bind(&expires)
        .fetch_all(&self.pool)
        .await?;
        let written: std::collections::HashMap<(String, String), i64> =
            rows.into_iter().map(|(c, k, v)| ((c, k), v)).collect();
        let versions: Vec<i64> = puts
            .iter()
            .map(|p| {
                written
                    .get(&(p.collection.to_string(), p.key.to_string()))
                    .copied()
                    .unwrap_or(1)
            })
            .collect();
        Ok(puts
            .iter()
            .zip(expires)
            .zip(versions)
            .map(|((p, expires_at), version)| Record {
                collection: p.collection.to_string(),
                key: p.key.to_string(),
                value: p.value.clone(),
                version,
                updated_at: now,
                expires_at,
            })
            .collect())
    }

    async fn meta_delete(&self, collection: &str, key: &str, expect: Expect) -> Result<bool> {
        check_names(collection, key)?;
        let version = match expect {
            Expect::Version(v) => Some(v),
            _ => None,
        };
        // Returns whether the deleted row was live; expired rows go too.
        let deleted: Option<bool> = sqlx::query_scalar(
            "DELETE FROM conveyor.meta WHERE collection = $1 AND key = $2 \
               AND ($3::bigint IS NULL OR version = $3 \
                    OR (expires_at IS NOT NULL AND expires_at <= now())) \
             RETURNING expires_at IS NULL OR expires_at > now()",
        )
        .bind(collection)
        .bind(key)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        match deleted {
            Some(live) => Ok(live),
            None if version.is_some() => match self.live_version(collection, key).await? {
                None => Ok(false),
                found => Err(conflict(collection, key, expect, found)),
            },
            None => Ok(false),
        }
    }

    async fn meta_list(&self, collection: &str, query: &MetaQuery) -> Result<Vec<Record>> {
        check_query(collection, query)?;
        let mut qb: QueryBuilder<Postgres> =
            QueryBuilder::new("SELECT * FROM conveyor.meta WHERE collection = ");
        qb.push_bind(collection)
            .push(" AND (expires_at IS NULL OR expires_at > ")
            .push_bind(self.clock_now().await?)
            .push(")");
        if let Some(prefix) = query.prefix.as_deref().filter(|p| !p.is_empty()) {
            qb.push(" AND key >= ")
                .push_bind(prefix)
                .push(" AND starts_with(key, ")
                .push_bind(prefix)
                .push(")");
        }
        let (cursor_cmp, order) = sql_direction(query);
        if let Some(cursor) = &query.after {
            qb.push(cursor_cmp).push_bind(cursor);
        }
        qb.push(order).push_bind(query.limit as i64);
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(record).collect()
    }

    async fn meta_prune(&self, now: DateTime<Utc>, limit: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM conveyor.meta WHERE (collection, key) IN \
             (SELECT collection, key FROM conveyor.meta \
              WHERE expires_at IS NOT NULL AND expires_at <= $1 LIMIT $2)",
        )
        .bind(now)
        .bind(limit as i64)
        .execute(&self.pool)
        .await?;
        let idle = now - chrono::Duration::from_std(IDLE_BUCKET).unwrap_or_default();
        sqlx::query(
            "DELETE FROM conveyor.rate_buckets WHERE bucket IN \
             (SELECT bucket FROM conveyor.rate_buckets WHERE updated_at <= $1 LIMIT $2)",
        )
        .bind(idle)
        .bind(limit as i64)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn take_tokens(
        &self,
        bucket: &str,
        limit: RateLimit,
        cost: f64,
        now: DateTime<Utc>,
    ) -> Result<TokenTake> {
        check_rate(bucket, limit, cost)?;
        // One statement: the row lock is held only while it runs, so many takers of one hot
        // bucket (every delivery to one webhook endpoint) queue for microseconds, not for a
        // transaction's round trips. The refill arithmetic is
        // `meta::bucket_refill`'s.
        const TAKE: &str = "WITH cur AS ( \
                SELECT least($2::float8, tokens + greatest(0::float8, \
                         extract(epoch FROM ($4::timestamptz - updated_at))::float8) * $3::float8) AS have \
                FROM conveyor.rate_buckets WHERE bucket = $1 FOR UPDATE), \
             upd AS ( \
                UPDATE conveyor.rate_buckets b \
                SET tokens = CASE WHEN cur.have >= $5 THEN cur.have - $5 ELSE cur.have END, \
                    updated_at = greatest(b.updated_at, $4) \
                FROM cur WHERE b.bucket = $1 \
                RETURNING cur.have) \
             SELECT have FROM upd";
        let mut have: Option<f64> = None;
        for _ in 0..2 {
            have = sqlx::query_scalar(TAKE)
                .bind(bucket)
                .bind(limit.burst)
                .bind(limit.per_second)
                .bind(now)
                .bind(cost)
                .fetch_optional(&self.pool)
                .await?;
            if have.is_some() {
                break;
            }
            // A new bucket starts full; then take from it like any other.
            sqlx::query(
                "INSERT INTO conveyor.rate_buckets (bucket, tokens, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (bucket) DO NOTHING",
            )
            .bind(bucket)
            .bind(limit.burst)
            .bind(now)
            .execute(&self.pool)
            .await?;
        }
        Ok(bucket_take(have.unwrap_or(0.0), limit, cost))
    }
}
