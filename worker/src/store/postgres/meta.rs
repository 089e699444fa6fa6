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
    Expect, IDLE_BUCKET, MetaQuery, MetaStore, Put, RateLimit, Record, TokenTake, bucket_step,
    check_names, check_query, check_rate, conflict,
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
        .fetch_optional(self.pool())
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
        .bind(Utc::now())
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(record).transpose()
    }

    async fn meta_put(&self, put: Put<'_>) -> Result<Record> {
        check_names(put.collection, put.key)?;
        let now = trunc(Utc::now());
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
            .fetch_optional(self.pool())
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
        .fetch_optional(self.pool())
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
            .push_bind(Utc::now())
            .push(")");
        if let Some(prefix) = query.prefix.as_deref().filter(|p| !p.is_empty()) {
            qb.push(" AND key >= ")
                .push_bind(prefix)
                .push(" AND starts_with(key, ")
                .push_bind(prefix)
                .push(")");
        }
        if let Some(cursor) = &query.after {
            qb.push(if query.descending {
                " AND key < "
            } else {
                " AND key > "
            })
            .push_bind(cursor);
        }
        qb.push(if query.descending {
            " ORDER BY key DESC LIMIT "
        } else {
            " ORDER BY key ASC LIMIT "
        })
        .push_bind(query.limit as i64);
        let rows = qb.build().fetch_all(self.pool()).await?;
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
        .execute(self.pool())
        .await?;
        let idle = now - chrono::Duration::from_std(IDLE_BUCKET).unwrap_or_default();
        sqlx::query(
            "DELETE FROM conveyor.rate_buckets WHERE bucket IN \
             (SELECT bucket FROM conveyor.rate_buckets WHERE updated_at <= $1 LIMIT $2)",
        )
        .bind(idle)
        .bind(limit as i64)
        .execute(self.pool())
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
        let mut tx = self.pool().begin().await?;
        // Make sure the row exists, then lock it: concurrent takers queue on the row lock.
        sqlx::query(
            "INSERT INTO conveyor.rate_buckets (bucket, tokens, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (bucket) DO NOTHING",
        )
        .bind(bucket)
        .bind(limit.burst)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let (tokens, last): (f64, DateTime<Utc>) = sqlx::query_as(
            "SELECT tokens, updated_at FROM conveyor.rate_buckets WHERE bucket = $1 FOR UPDATE",
        )
        .bind(bucket)
        .fetch_one(&mut *tx)
        .await?;
        let (allowed, left, wait) = bucket_step(Some(tokens), Some(last), limit, cost, now);
        sqlx::query(
            "UPDATE conveyor.rate_buckets SET tokens = $2, updated_at = greatest(updated_at, $3) \
             WHERE bucket = $1",
        )
        .bind(bucket)
        .bind(left)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(TokenTake {
            allowed,
            remaining: left,
            retry_after: std::time::Duration::from_secs_f64(wait),
        })
    }
}
