//! TEMPORARY stand-in for `conveyor_worker::store::meta` until the meta store lands on main:
//! the same types and method names, every call failing with `Unsupported`. Replaced by a
//! re-export when main is merged.
#![allow(dead_code, missing_docs)]

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use conveyor_worker::{Error, Result, Store};
use serde::{Deserialize, Serialize};
use serde_json::Value;

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


#[async_trait]
pub trait MetaStore {
    async fn meta_get(&self, collection: &str, key: &str) -> Result<Option<Record>>;
    async fn meta_put(&self, put: Put<'_>) -> Result<Record>;
    async fn meta_delete(&self, collection: &str, key: &str, expect: Expect) -> Result<bool>;
    async fn meta_list(&self, collection: &str, query: &MetaQuery) -> Result<Vec<Record>>;
    async fn take_tokens(&self, bucket: &str, limit: RateLimit, cost: f64, now: DateTime<Utc>) -> Result<TokenTake>;
}

fn missing() -> Error {
    Error::Unsupported("the meta store is not available in this build".into())
}

#[async_trait]
impl MetaStore for dyn Store {
    async fn meta_get(&self, _: &str, _: &str) -> Result<Option<Record>> { Err(missing()) }
    async fn meta_put(&self, _: Put<'_>) -> Result<Record> { Err(missing()) }
    async fn meta_delete(&self, _: &str, _: &str, _: Expect) -> Result<bool> { Err(missing()) }
    async fn meta_list(&self, _: &str, _: &MetaQuery) -> Result<Vec<Record>> { Err(missing()) }
    async fn take_tokens(&self, _: &str, _: RateLimit, _: f64, _: DateTime<Utc>) -> Result<TokenTake> { Err(missing()) }
}
