//! Small records beside the jobs: schedules, API keys, the audit log, queue settings, worker
//! registrations, webhook endpoints. Every backend keeps them next to its jobs (a `meta` table
//! on SQLite and Postgres, hashes under the prefix on Redis), so a deployment needs nothing
//! else.
//!
//! A record is a JSON value under `(collection, key)` with a version that goes up by one on
//! every write. Writers that read-modify-write pass [`Expect::Version`] and get
//! [`Error::Conflict`] if someone else wrote in between; creators pass [`Expect::Absent`].
//! Records may expire ([`Put::ttl`]): an expired record is invisible at once and deleted by
//! the next [`MetaStore::meta_prune`].
//!
//! Beside the records, [`MetaStore::take_tokens`] is a token bucket shared by every process
//! on the store (API rate limits, webhook endpoint rate limits).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Longest collection name.
pub const MAX_COLLECTION: usize = 64;
/// Longest key.
pub const MAX_KEY: usize = 512;

/// A rate bucket untouched this long is deleted by [`MetaStore::meta_prune`]; it starts full
/// when next used, which is what it would hold by then for any rate that refills its burst
/// within a day.
pub const IDLE_BUCKET: Duration = Duration::from_secs(24 * 3600);

/// One stored record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Its collection, e.g. `schedules`.
    pub collection: String,
    /// Its key, unique within the collection.
    pub key: String,
    /// The value.
    pub value: Value,
    /// 1 after the first write, +1 on each later write.
    pub version: i64,
    /// When it was last written.
    pub updated_at: DateTime<Utc>,
    /// When it stops being visible, if it expires.
    pub expires_at: Option<DateTime<Utc>>,
}

impl Record {
    /// The value as `T`.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        Ok(serde_json::from_value(self.value.clone())?)
    }
}

/// What a write expects to find.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Expect {
    /// Anything: create or overwrite.
    #[default]
    Any,
    /// No record yet: create only.
    Absent,
    /// Exactly this version: update only if nobody wrote since it was read.
    Version(i64),
}

/// One write.
#[derive(Clone, Debug, PartialEq)]
pub struct Put<'a> {
    /// The collection.
    pub collection: &'a str,
    /// The key.
    pub key: &'a str,
    /// The new value.
    pub value: &'a Value,
    /// What must be there now.
    pub expect: Expect,
    /// Expire this long after the write (`None`: never).
    pub ttl: Option<Duration>,
}

impl<'a> Put<'a> {
    /// An unconditional write that never expires.
    pub fn new(collection: &'a str, key: &'a str, value: &'a Value) -> Self {
        Self {
            collection,
            key,
            value,
            expect: Expect::Any,
            ttl: None,
        }
    }

    /// With a precondition.
    pub fn expect(mut self, expect: Expect) -> Self {
        self.expect = expect;
        self
    }

    /// Expiring after `ttl`.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// Which records a listing returns: keys in order, one page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaQuery {
    /// Only keys starting with this.
    pub prefix: Option<String>,
    /// Continue after this key (exclusive; "after" in the listing's direction).
    pub after: Option<String>,
    /// Page size, 1..=1000.
    pub limit: u32,
    /// Highest key first. Keys that are UUIDv7 strings then list newest first.
    pub descending: bool,
}

impl Default for MetaQuery {
    fn default() -> Self {
        Self {
            prefix: None,
            after: None,
            limit: 100,
            descending: false,
        }
    }
}

/// A token bucket's settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Tokens added per second.
    pub per_second: f64,
    /// Bucket size: the most that can be taken at once after a quiet spell.
    pub burst: f64,
}

/// The answer of [`MetaStore::take_tokens`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenTake {
    /// The tokens were taken.
    pub allowed: bool,
    /// Tokens left in the bucket after this call.
    pub remaining: f64,
    /// When refused: how long until enough tokens have refilled.
    pub retry_after: Duration,
}

/// Small shared records and rate-limit buckets. Every [`crate::Store`] is one.
#[async_trait]
pub trait MetaStore: Send + Sync {
    /// The record under `key`, unless missing or expired.
    async fn meta_get(&self, collection: &str, key: &str) -> Result<Option<Record>>;

    /// Writes one record; fails with [`Error::Conflict`] if `put.expect` does not hold
    /// (an expired record counts as absent).
    async fn meta_put(&self, put: Put<'_>) -> Result<Record>;

    /// Writes many records, each exactly as [`MetaStore::meta_put`] would, in as few round
    /// trips as the backend allows (one statement on Postgres, one transaction on SQLite for
    /// unconditional writes). Not atomic as a whole: on an error, earlier records may be
    /// written. Returns the records in input order.
    async fn meta_put_many(&self, puts: &[Put<'_>]) -> Result<Vec<Record>> {
        let mut out = Vec::with_capacity(puts.len());
        for put in puts {
            out.push(self.meta_put(put.clone()).await?);
        }
        Ok(out)
    }

    /// Deletes one record; `Ok(false)` if there was none (or it had expired). With
    /// `Expect::Version(v)` it deletes only that version, else [`Error::Conflict`].
    async fn meta_delete(&self, collection: &str, key: &str, expect: Expect) -> Result<bool>;

    /// One page of a collection's live records in key order.
    async fn meta_list(&self, collection: &str, query: &MetaQuery) -> Result<Vec<Record>>;

    /// Deletes up to `limit` records that expired before `now`; returns how many.
    async fn meta_prune(&self, now: DateTime<Utc>, limit: u32) -> Result<u64>;

    /// Takes `cost` tokens from the bucket named `bucket` if it holds that many at `now`.
    /// A bucket starts full; buckets idle long enough to be full again may be forgotten.
    /// Atomic across every process on the store.
    async fn take_tokens(
        &self,
        bucket: &str,
        limit: RateLimit,
        cost: f64,
        now: DateTime<Utc>,
    ) -> Result<TokenTake>;
}

/// Every live record of a collection in key order, read 1,000 at a time. For the small
/// collections (schedules, keys, queue settings, endpoints); callers page large ones.
pub async fn list_all(store: &(impl MetaStore + ?Sized), collection: &str) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    loop {
        let page = store
            .meta_list(
                collection,
                &MetaQuery {
                    after: out.last().map(|r: &Record| r.key.clone()),
                    limit: 1000,
                    ..MetaQuery::default()
                },
            )
            .await?;
        let full = page.len() == 1000;
        out.extend(page);
        if !full {
            return Ok(out);
        }
    }
}

/// Checks a collection name and key before they reach a backend.
pub fn check_names(collection: &str, key: &str) -> Result<()> {
    if collection.is_empty()
        || collection.len() > MAX_COLLECTION
        || !collection
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(Error::invalid(
            "collection",
            format!(
                "`{collection}` must be 1 to {MAX_COLLECTION} characters of letters, digits, `_`, `-` or `.`"
            ),
        ));
    }
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(Error::invalid(
            "key",
            format!("must be 1 to {MAX_KEY} bytes, got {}", key.len()),
        ));
    }
    Ok(())
}

/// Checks a listing request.
pub fn check_query(collection: &str, query: &MetaQuery) -> Result<()> {
    check_names(collection, "-")?;
    if query.limit == 0 || query.limit > 1000 {
        return Err(Error::invalid(
            "limit",
            format!("must be between 1 and 1000, got {}", query.limit),
        ));
    }
    Ok(())
}

/// For the SQL backends' listings: the cursor comparison and the ordering (ending in
/// `LIMIT `) of `query`'s direction.
pub(crate) fn sql_direction(query: &MetaQuery) -> (&'static str, &'static str) {
    if query.descending {
        (" AND key < ", " ORDER BY key DESC LIMIT ")
    } else {
        (" AND key > ", " ORDER BY key ASC LIMIT ")
    }
}

/// Checks bucket settings.
pub fn check_rate(bucket: &str, limit: RateLimit, cost: f64) -> Result<()> {
    if bucket.is_empty() || bucket.len() > MAX_KEY {
        return Err(Error::invalid("bucket", "must be 1 to 512 bytes"));
    }
    if !(limit.per_second.is_finite() && limit.per_second > 0.0) {
        return Err(Error::invalid(
            "per_second",
            format!("must be a positive number, got {}", limit.per_second),
        ));
    }
    if !(limit.burst.is_finite() && limit.burst >= 1.0) {
        return Err(Error::invalid(
            "burst",
            format!("must be at least 1, got {}", limit.burst),
        ));
    }
    if !(cost.is_finite() && cost >= 0.0) {
        return Err(Error::invalid("cost", format!("must be ≥ 0, got {cost}")));
    }
    Ok(())
}

/// The error for a write whose expectation failed; `found` is the live version, if any.
pub fn conflict(collection: &str, key: &str, expect: Expect, found: Option<i64>) -> Error {
    let what = format!("{collection} `{key}`");
    Error::Conflict(match (expect, found) {
        (Expect::Absent, _) => format!("{what} already exists; pick another name or update it"),
        (Expect::Version(_), None) => format!("{what} does not exist"),
        (Expect::Version(v), Some(f)) => format!(
            "{what} was changed by someone else (expected version {v}, found {f}); read it again and retry"
        ),
        (Expect::Any, _) => format!("{what} could not be written"),
    })
}

/// Whether `expect` holds when the live version is `found`.
pub fn expect_holds(expect: Expect, found: Option<i64>) -> bool {
    match expect {
        Expect::Any => true,
        Expect::Absent => found.is_none(),
        Expect::Version(v) => found == Some(v),
    }
}

/// The token bucket's refill, which every backend applies (the SQL backends in SQL, Redis in
/// Lua, with the same arithmetic): what the bucket holds at `now`, given what it held
/// (`None`: a new bucket, full) at `last`, capped at `burst`.
pub fn bucket_refill(
    tokens: Option<f64>,
    last: Option<DateTime<Utc>>,
    limit: RateLimit,
    now: DateTime<Utc>,
) -> f64 {
    let elapsed = match last {
        Some(t) => ((now - t).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6).max(0.0),
        None => 0.0,
    };
    (tokens.unwrap_or(limit.burst) + elapsed * limit.per_second).min(limit.burst)
}

/// The token bucket's take: `cost` tokens out of `have` if there are enough, else how long
/// until there will be.
pub fn bucket_take(have: f64, limit: RateLimit, cost: f64) -> TokenTake {
    if have >= cost {
        TokenTake {
            allowed: true,
            remaining: have - cost,
            retry_after: Duration::ZERO,
        }
    } else {
        TokenTake {
            allowed: false,
            remaining: have,
            retry_after: wait(((cost - have) / limit.per_second).max(0.0)),
        }
    }
}

/// A bucket's wait in seconds as a `Duration`, saturating: a rate of 1e-300 per second
/// means "not in any lifetime", not a panic. NaN (no rate) waits nothing.
pub(crate) fn wait(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        Duration::ZERO
    } else {
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_and_refuses() {
        let limit = RateLimit {
            per_second: 10.0,
            burst: 5.0,
        };
        let t0 = Utc::now();
        let full = bucket_refill(None, None, limit, t0);
        assert_eq!(full, 5.0);
        let take = bucket_take(full, limit, 5.0);
        assert!(take.allowed);
        assert_eq!(take.remaining, 0.0);
        let refused = bucket_take(bucket_refill(Some(0.0), Some(t0), limit, t0), limit, 1.0);
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 0.0);
        assert!((refused.retry_after.as_secs_f64() - 0.1).abs() < 1e-9);
        assert_eq!(wait(1e300), Duration::MAX);
        assert_eq!(wait(f64::INFINITY), Duration::MAX);
        assert_eq!(wait(f64::NAN), Duration::ZERO);
        let later = t0 + chrono::Duration::milliseconds(300);
        let take = bucket_take(bucket_refill(Some(0.0), Some(t0), limit, later), limit, 1.0);
        assert!(take.allowed);
        assert!((take.remaining - 2.0).abs() < 1e-9);
        // Never above the burst, however long it was idle.
        let idle = t0 + chrono::Duration::days(1);
        assert_eq!(bucket_refill(Some(1.0), Some(t0), limit, idle), 5.0);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_names("schedules", "nightly").is_ok());
        assert!(check_names("", "k").is_err());
        assert!(check_names("a b", "k").is_err());
        assert!(check_names("c", "").is_err());
    }
}
