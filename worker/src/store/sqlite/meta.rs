//! [`MetaStore`] on SQLite: the `meta` and `rate_buckets` tables (migration 0002). Writes run
//! in one `BEGIN IMMEDIATE` transaction on the writer, so read-check-write is atomic across
//! processes sharing the file.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite};

use super::{SqliteStore, after, from_micros, micros};
use crate::error::Result;
use crate::store::meta::{
    Expect, IDLE_BUCKET, MetaQuery, MetaStore, Put, RateLimit, Record, TokenTake, bucket_refill,
    bucket_take, check_names, check_query, check_rate, conflict, expect_holds, sql_direction,
};

fn record(row: &SqliteRow) -> Result<Record> {
    let value: String = row.try_get("value")?;
    Ok(Record {
        collection: row.try_get("collection")?,
        key: row.try_get("key")?,
        value: serde_json::from_str(&value)?,
        version: row.try_get("version")?,
        updated_at: from_micros(row.try_get("updated_at")?),
        expires_at: row
            .try_get::<Option<i64>, _>("expires_at")?
            .map(from_micros),
    })
}

const LIVE: &str = "(expires_at IS NULL OR expires_at > ?)";

#[async_trait]
impl MetaStore for SqliteStore {
    async fn meta_get(&self, collection: &str, key: &str) -> Result<Option<Record>> {
        check_names(collection, key)?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT * FROM meta WHERE collection = ? AND key = ? AND {LIVE}"
        )))
        .bind(collection)
        .bind(key)
        .bind(micros(Utc::now()))
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(record).transpose()
    }

    async fn meta_put(&self, put: Put<'_>) -> Result<Record> {
        check_names(put.collection, put.key)?;
        let now = Utc::now();
        let expires_at = put.ttl.map(|t| after(now, t));
        let value = serde_json::to_string(put.value)?;
        let mut tx = self.begin().await?;
        let found: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT version FROM meta WHERE collection = ? AND key = ? AND {LIVE}"
        )))
        .bind(put.collection)
        .bind(put.key)
        .bind(micros(now))
        .fetch_optional(&mut *tx)
        .await?;
        if !expect_holds(put.expect, found) {
            return Err(conflict(put.collection, put.key, put.expect, found));
        }
        let version = found.unwrap_or(0) + 1;
        sqlx::query(
            "INSERT INTO meta (collection, key, value, version, updated_at, expires_at) \
             VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (collection, key) DO UPDATE SET value = excluded.value, \
               version = excluded.version, updated_at = excluded.updated_at, \
               expires_at = excluded.expires_at",
        )
        .bind(put.collection)
        .bind(put.key)
        .bind(&value)
        .bind(version)
        .bind(micros(now))
        .bind(expires_at.map(micros))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Record {
            collection: put.collection.to_string(),
            key: put.key.to_string(),
            value: put.value.clone(),
            version,
            updated_at: from_micros(micros(now)),
            expires_at: expires_at.map(|t| from_micros(micros(t))),
        })
    }

    async fn meta_put_many(&self, puts: &[Put<'_>]) -> Result<Vec<Record>> {
        if puts.len() < 2 || puts.iter().any(|p| p.expect != Expect::Any) {
            let mut out = Vec::with_capacity(puts.len());
            for put in puts {
                out.push(self.meta_put(put.clone()).await?);
            }
            return Ok(out);
        }
        for put in puts {
            check_names(put.collection, put.key)?;
        }
        let now = Utc::now();
        let mut out = Vec::with_capacity(puts.len());
        let mut tx = self.begin().await?;
        for put in puts {
            let expires_at = put.ttl.map(|t| after(now, t));
            // An expired row counts as absent: it starts again at version 1.
            let version: i64 = sqlx::query_scalar(
                "INSERT INTO meta AS m (collection, key, value, version, updated_at, expires_at) \
                 VALUES (?1, ?2, ?3, 1, ?4, ?5) \
                 ON CONFLICT (collection, key) DO UPDATE SET value = excluded.value, \
                   version = CASE WHEN m.expires_at IS NOT NULL AND m.expires_at <= ?4 THEN 1 \
                                  ELSE m.version + 1 END, \
                   updated_at = excluded.updated_at, expires_at = excluded.expires_at \
                 RETURNING version",
            )
            .bind(put.collection)
            .bind(put.key)
            .bind(serde_json::to_string(put.value)?)
            .bind(micros(now))
            .bind(expires_at.map(micros))
            .fetch_one(&mut *tx)
            .await?;
            out.push(Record {
                collection: put.collection.to_string(),
                key: put.key.to_string(),
                value: put.value.clone(),
                version,
                updated_at: from_micros(micros(now)),
                expires_at: expires_at.map(|t| from_micros(micros(t))),
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn meta_delete(&self, collection: &str, key: &str, expect: Expect) -> Result<bool> {
        check_names(collection, key)?;
        let now = micros(Utc::now());
        let mut tx = self.begin().await?;
        let found: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT version FROM meta WHERE collection = ? AND key = ? AND {LIVE}"
        )))
        .bind(collection)
        .bind(key)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        if matches!(expect, Expect::Version(_)) && found.is_some() && !expect_holds(expect, found) {
            return Err(conflict(collection, key, expect, found));
        }
        // Expired rows go too: to a reader they are already gone.
        sqlx::query("DELETE FROM meta WHERE collection = ? AND key = ?")
            .bind(collection)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(found.is_some())
    }

    async fn meta_list(&self, collection: &str, query: &MetaQuery) -> Result<Vec<Record>> {
        check_query(collection, query)?;
        let mut qb: QueryBuilder<Sqlite> =
            QueryBuilder::new("SELECT * FROM meta WHERE collection = ");
        qb.push_bind(collection)
            .push(" AND (expires_at IS NULL OR expires_at > ")
            .push_bind(micros(Utc::now()))
            .push(")");
        if let Some(prefix) = query.prefix.as_deref().filter(|p| !p.is_empty()) {
            qb.push(" AND key >= ")
                .push_bind(prefix)
                .push(" AND substr(key, 1, length(")
                .push_bind(prefix)
                .push(")) = ")
                .push_bind(prefix);
        }
        let (cursor_cmp, order) = sql_direction(query);
        if let Some(cursor) = &query.after {
            qb.push(cursor_cmp).push_bind(cursor);
        }
        qb.push(order).push_bind(query.limit as i64);
        let rows = qb.build().fetch_all(&self.reader).await?;
        rows.iter().map(record).collect()
    }

    async fn meta_prune(&self, now: DateTime<Utc>, limit: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM meta WHERE (collection, key) IN \
             (SELECT collection, key FROM meta WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?)",
        )
        .bind(micros(now))
        .bind(limit as i64)
        .execute(&self.writer)
        .await?;
        sqlx::query(
            "DELETE FROM rate_buckets WHERE bucket IN \
             (SELECT bucket FROM rate_buckets WHERE updated_at <= ? LIMIT ?)",
        )
        .bind(micros(now) - IDLE_BUCKET.as_micros() as i64)
        .bind(limit as i64)
        .execute(&self.writer)
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
        let mut tx = self.begin().await?;
        let row: Option<(f64, i64)> =
            sqlx::query_as("SELECT tokens, updated_at FROM rate_buckets WHERE bucket = ?")
                .bind(bucket)
                .fetch_optional(&mut *tx)
                .await?;
        let have = bucket_refill(row.map(|r| r.0), row.map(|r| from_micros(r.1)), limit, now);
        let take = bucket_take(have, limit, cost);
        sqlx::query(
            "INSERT INTO rate_buckets (bucket, tokens, updated_at) VALUES (?, ?, ?) \
             ON CONFLICT (bucket) DO UPDATE SET tokens = excluded.tokens, \
               updated_at = max(updated_at, excluded.updated_at)",
        )
        .bind(bucket)
        .bind(take.remaining)
        .bind(micros(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(take)
    }
}
