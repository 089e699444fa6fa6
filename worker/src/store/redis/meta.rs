//! [`MetaStore`] on Redis. All meta keys share the hash tag `{P:meta}` (one Cluster slot;
//! the records are few and small):
//!
//! | key | what |
//! |---|---|
//! | `{P:meta}:r:<collection>:<key>` | hash: `v` (the JSON value), `ver`, `up` and `exp` (µs; empty: never) |
//! | `{P:meta}:i:<collection>` | zset, all scores 0: the collection's keys in byte order, for listing |
//! | `{P:meta}:exp` | zset of `<collection>:<key>` by expiry (µs): the pruner's work list |
//! | `{P:meta}:tb:<bucket>` | hash: a token bucket (`t` tokens, `up` µs); expires once full again |
//!
//! Every write is one script. Expired records are invisible at once (the scripts and reads
//! compare `exp` with the caller's clock) and deleted by [`MetaStore::meta_prune`].

use std::sync::LazyLock;

use ::redis::Script;
use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{RedisStore, after};
use crate::error::{Error, Result};
use crate::store::meta::{
    Expect, MetaQuery, MetaStore, Put, RateLimit, Record, TokenTake, check_names, check_query,
    check_rate, conflict,
};

static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local rec, idx, exp = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[3])
local cur = redis.call('HMGET', rec, 'ver', 'exp')
local found = -1
if cur[1] and (not cur[2] or cur[2] == '' or tonumber(cur[2]) > now) then
  found = tonumber(cur[1])
end
local kind = ARGV[5]
if (kind == 'absent' and found >= 0) or (kind == 'version' and found ~= tonumber(ARGV[6])) then
  return {0, found}
end
local ver = math.max(found, 0) + 1
redis.call('HSET', rec, 'v', ARGV[2], 'ver', ver, 'up', ARGV[3], 'exp', ARGV[4])
redis.call('ZADD', idx, 0, ARGV[7])
if ARGV[4] ~= '' then
  redis.call('ZADD', exp, ARGV[4], ARGV[1])
else
  redis.call('ZREM', exp, ARGV[1])
end
return {1, ver}
"#,
    )
});

static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local rec, idx, exp = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[2])
local cur = redis.call('HMGET', rec, 'ver', 'exp')
local found = -1
if cur[1] and (not cur[2] or cur[2] == '' or tonumber(cur[2]) > now) then
  found = tonumber(cur[1])
end
if ARGV[3] ~= '' and found >= 0 and found ~= tonumber(ARGV[3]) then
  return {0, found}
end
redis.call('DEL', rec)
redis.call('ZREM', idx, ARGV[4])
redis.call('ZREM', exp, ARGV[1])
return {1, found}
"#,
    )
});

/// KEYS[1] the index; ARGV: record key base, min, max, limit, reverse, now. Returns flat
/// `key, value, version, updated, expires` per live record, skipping expired ones (reading
/// on, at most 20 rounds, to fill the page).
static LIST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local idx, base = KEYS[1], ARGV[1]
local limit, rev, now = tonumber(ARGV[4]), ARGV[5] == '1', tonumber(ARGV[6])
local out, n, offset = {}, 0, 0
for round = 1, 20 do
  local keys
  if rev then
    keys = redis.call('ZREVRANGEBYLEX', idx, ARGV[3], ARGV[2], 'LIMIT', offset, limit)
  else
    keys = redis.call('ZRANGEBYLEX', idx, ARGV[2], ARGV[3], 'LIMIT', offset, limit)
  end
  for _, k in ipairs(keys) do
    if n < limit then
      local r = redis.call('HMGET', base .. k, 'v', 'ver', 'up', 'exp')
      if r[1] and (not r[4] or r[4] == '' or tonumber(r[4]) > now) then
        out[#out + 1] = k
        out[#out + 1] = r[1]
        out[#out + 1] = r[2]
        out[#out + 1] = r[3]
        out[#out + 1] = r[4] or ''
        n = n + 1
      end
    end
  end
  offset = offset + #keys
  if n >= limit or #keys < limit then break end
end
return out
"#,
    )
});

/// KEYS[1] the expiry set; ARGV: meta key base `{P:meta}`, now, limit.
static PRUNE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local exp, base, now = KEYS[1], ARGV[1], tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', exp, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local n = 0
for _, member in ipairs(due) do
  local colon = string.find(member, ':', 1, true)
  local rec = base .. ':r:' .. member
  local e = redis.call('HGET', rec, 'exp')
  if e and e ~= '' and tonumber(e) <= now then
    redis.call('DEL', rec)
    redis.call('ZREM', base .. ':i:' .. string.sub(member, 1, colon - 1), string.sub(member, colon + 1))
    n = n + 1
  end
  redis.call('ZREM', exp, member)
end
return n
"#,
    )
});

/// KEYS[1] the bucket; ARGV: per second, burst, cost, now (µs). The arithmetic of
/// `meta::bucket_refill` and `meta::bucket_take`.
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local rate, burst, cost, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local cur = redis.call('HMGET', KEYS[1], 't', 'up')
local have = burst
local last = now
if cur[1] then
  last = tonumber(cur[2])
  local elapsed = math.max(0, (now - last) / 1e6)
  have = math.min(burst, tonumber(cur[1]) + elapsed * rate)
end
local allowed, wait = 0, 0
if have >= cost then
  allowed = 1
  have = have - cost
else
  wait = (cost - have) / rate
end
redis.call('HSET', KEYS[1], 't', string.format('%.17g', have), 'up', string.format('%d', math.max(now, last)))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - have) / rate * 1000) + 1000)
return {allowed, string.format('%.17g', have), string.format('%.17g', wait)}
"#,
    )
});

impl RedisStore {
    fn meta_base(&self) -> String {
        format!("{{{}:meta}}", self.keys.prefix)
    }

    fn meta_keys(&self, collection: &str, key: &str) -> (String, String, String) {
        let base = self.meta_base();
        (
            format!("{base}:r:{collection}:{key}"),
            format!("{base}:i:{collection}"),
            format!("{base}:exp"),
        )
    }
}

fn from_micros_str(s: &str) -> Result<DateTime<Utc>> {
    s.parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(|| Error::Unsupported(format!("stored time `{s}` is not microseconds")))
}

fn opt_time(s: &str) -> Result<Option<DateTime<Utc>>> {
    if s.is_empty() {
        Ok(None)
    } else {
        from_micros_str(s).map(Some)
    }
}

/// Lexical range bounds for `ZRANGEBYLEX`: (min, max) as bytes.
fn lex_bounds(query: &MetaQuery) -> (Vec<u8>, Vec<u8>) {
    let prefix = query.prefix.as_deref().filter(|p| !p.is_empty());
    // 0xff never occurs in UTF-8, so `prefix ++ 0xff` is above every key starting with it.
    let mut low: Vec<u8> = match prefix {
        Some(p) => [b"[", p.as_bytes()].concat(),
        None => b"-".to_vec(),
    };
    let mut high: Vec<u8> = match prefix {
        Some(p) => [b"[", p.as_bytes(), &[0xff]].concat(),
        None => b"+".to_vec(),
    };
    if let Some(cursor) = &query.after {
        let excl = [b"(", cursor.as_bytes()].concat();
        if query.descending {
            if high == b"+" || excl[1..] < high[1..] {
                high = excl;
            }
        } else if low == b"-" || excl[1..] >= low[1..] {
            low = excl;
        }
    }
    (low, high)
}

#[async_trait]
impl MetaStore for RedisStore {
    async fn meta_get(&self, collection: &str, key: &str) -> Result<Option<Record>> {
        check_names(collection, key)?;
        let (rec, _, _) = self.meta_keys(collection, key);
        let mut conn = self.conn.clone();
        let got: Vec<Option<String>> = ::redis::cmd("HMGET")
            .arg(&rec)
            .arg(&["v", "ver", "up", "exp"])
            .query_async(&mut conn)
            .await?;
        let [Some(v), Some(ver), Some(up), exp] = <[Option<String>; 4]>::try_from(got)
            .map_err(|_| Error::Unsupported("HMGET answered the wrong arity".into()))?
        else {
            return Ok(None);
        };
        let expires_at = opt_time(exp.as_deref().unwrap_or(""))?;
        if let Some(e) = expires_at
            && e <= self.clock_now().await?
        {
            return Ok(None);
        }
        Ok(Some(Record {
            collection: collection.to_string(),
            key: key.to_string(),
            value: serde_json::from_str(&v)?,
            version: ver.parse().unwrap_or(0),
            updated_at: from_micros_str(&up)?,
            expires_at,
        }))
    }

    async fn meta_put(&self, put: Put<'_>) -> Result<Record> {
        check_names(put.collection, put.key)?;
        let (rec, idx, exp) = self.meta_keys(put.collection, put.key);
        let now = self.clock_now().await?;
        let now_us = now.timestamp_micros();
        let expires_at = put.ttl.map(|t| after(now, t));
        let (kind, want) = match put.expect {
            Expect::Any => ("any", 0),
            Expect::Absent => ("absent", 0),
            Expect::Version(v) => ("version", v),
        };
        let (ok, version): (i64, i64) = self
            .eval(
                PUT.key(&rec)
                    .key(&idx)
                    .key(&exp)
                    .arg(format!("{}:{}", put.collection, put.key))
                    .arg(serde_json::to_string(put.value)?)
                    .arg(now_us)
                    .arg(
                        expires_at
                            .map(|t| t.timestamp_micros().to_string())
                            .unwrap_or_default(),
                    )
                    .arg(kind)
                    .arg(want)
                    .arg(put.key),
            )
            .await?;
        if ok == 0 {
            let found = (version >= 0).then_some(version);
            return Err(conflict(put.collection, put.key, put.expect, found));
        }
        Ok(Record {
            collection: put.collection.to_string(),
            key: put.key.to_string(),
            value: put.value.clone(),
            version,
            updated_at: DateTime::from_timestamp_micros(now_us).unwrap_or(now),
            expires_at: expires_at
                .map(|t| DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)),
        })
    }

    async fn meta_put_many(&self, puts: &[Put<'_>]) -> Result<Vec<Record>> {
        // Sent together on the multiplexed connection: one round trip's worth of waiting.
        futures::future::try_join_all(puts.iter().map(|p| self.meta_put(p.clone()))).await
    }

    async fn meta_delete(&self, collection: &str, key: &str, expect: Expect) -> Result<bool> {
        check_names(collection, key)?;
        let (rec, idx, exp) = self.meta_keys(collection, key);
        let want = match expect {
            Expect::Version(v) => v.to_string(),
            _ => String::new(),
        };
        let (ok, found): (i64, i64) = self
            .eval(
                DELETE
                    .key(&rec)
                    .key(&idx)
                    .key(&exp)
                    .arg(format!("{collection}:{key}"))
                    .arg(self.clock_now().await?.timestamp_micros())
                    .arg(want)
                    .arg(key),
            )
            .await?;
        if ok == 0 {
            return Err(conflict(collection, key, expect, Some(found)));
        }
        Ok(found >= 0)
    }

    async fn meta_list(&self, collection: &str, query: &MetaQuery) -> Result<Vec<Record>> {
        check_query(collection, query)?;
        let base = self.meta_base();
        let (low, high) = lex_bounds(query);
        let flat: Vec<String> = self
            .eval(
                LIST.key(format!("{base}:i:{collection}"))
                    .arg(format!("{base}:r:{collection}:"))
                    .arg(low)
                    .arg(high)
                    .arg(query.limit)
                    .arg(if query.descending { "1" } else { "0" })
                    .arg(self.clock_now().await?.timestamp_micros()),
            )
            .await?;
        flat.chunks_exact(5)
            .map(|r| {
                Ok(Record {
                    collection: collection.to_string(),
                    key: r[0].clone(),
                    value: serde_json::from_str(&r[1])?,
                    version: r[2].parse().unwrap_or(0),
                    updated_at: from_micros_str(&r[3])?,
                    expires_at: opt_time(&r[4])?,
                })
            })
            .collect()
    }

    async fn meta_prune(&self, now: DateTime<Utc>, limit: u32) -> Result<u64> {
        let base = self.meta_base();
        let n: u64 = self
            .eval(
                PRUNE
                    .key(format!("{base}:exp"))
                    .arg(&base)
                    .arg(now.timestamp_micros())
                    .arg(limit),
            )
            .await?;
        Ok(n)
    }

    async fn take_tokens(
        &self,
        bucket: &str,
        limit: RateLimit,
        cost: f64,
        now: DateTime<Utc>,
    ) -> Result<TokenTake> {
        check_rate(bucket, limit, cost)?;
        let (allowed, left, wait): (i64, String, String) = self
            .eval(
                TAKE.key(format!("{}:tb:{bucket}", self.meta_base()))
                    .arg(limit.per_second)
                    .arg(limit.burst)
                    .arg(cost)
                    .arg(now.timestamp_micros()),
            )
            .await?;
        Ok(TokenTake {
            allowed: allowed == 1,
            remaining: left.parse().unwrap_or(0.0),
            retry_after: crate::store::meta::wait(wait.parse::<f64>().unwrap_or(0.0)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lex_bounds_cover_prefix_and_cursor() {
        let q = MetaQuery {
            prefix: Some("ab".into()),
            ..MetaQuery::default()
        };
        assert_eq!(lex_bounds(&q), (b"[ab".to_vec(), b"[ab\xff".to_vec()));
        let q = MetaQuery {
            after: Some("abc".into()),
            ..q
        };
        assert_eq!(lex_bounds(&q).0, b"(abc".to_vec());
        let q = MetaQuery {
            descending: true,
            ..q
        };
        assert_eq!(lex_bounds(&q), (b"[ab".to_vec(), b"(abc".to_vec()));
        let all = MetaQuery::default();
        assert_eq!(lex_bounds(&all), (b"-".to_vec(), b"+".to_vec()));
    }
}
