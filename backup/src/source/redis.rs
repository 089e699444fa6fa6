//! A Redis store: every key under the store's prefix (`P:…` and `{P:…}:…`), read with `SCAN`
//! and `DUMP`/`PTTL` in batches and streamed as records into the same zstd and manifest
//! pipeline as the other sources; restored with `RESTORE … REPLACE` under a target prefix.
//!
//! The stream is `CVRD1\n`, then per key: the key without its prefix (u32 length, bytes), its
//! remaining time to live in ms (i64, 0: none), the `DUMP` payload (u32 length, bytes); then a
//! zero length ending it (a truncated stream is an error, not a shorter store).
//!
//! The figures are counts per key role (`jobs` for the job hashes, `hist`, `ready`, `index`,
//! …) and per Redis type (`type:hash`, …), each with an order-independent checksum of the keys'
//! names and contents (a hash's fields and a set's members sorted; not the `DUMP` payload,
//! whose bytes depend on the encoding and iteration order Redis picked).
//!
//! `SCAN` is not a snapshot: keys written while it runs may be read before or after the
//! write. See docs/backups.md.

use std::collections::{BTreeMap, HashSet};

use sha2::Digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Dump, Finish};
use crate::error::{Error, Result};
use crate::manifest::TableFigures;

/// The stream's first bytes.
pub(crate) const HEADER: &[u8] = b"CVRD1\n";
/// Keys per `SCAN` step and per pipeline.
const BATCH: usize = 500;

/// The prefix a Redis store URL names (`?prefix=`, default `conveyor`), and the URL to
/// connect with (without Conveyor's own parameters).
pub(crate) fn split(url: &str) -> Result<(String, String)> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut prefix = "conveyor".to_string();
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("prefix", v)) => prefix = v.to_string(),
            Some(("allow_eviction", _)) => {}
            _ => rest.push(pair),
        }
    }
    if !rest.is_empty() {
        return Err(Error::Config(format!(
            "backups of a Redis store support plain redis:// URLs with `?prefix=` only, not `{}`",
            rest.join("&")
        )));
    }
    if url.starts_with("rediss://") {
        return Err(Error::Config(
            "backups of a Redis store over TLS (rediss://) are not supported yet".into(),
        ));
    }
    Ok((base.to_string(), prefix))
}

/// `key` without `prefix`: `{P:Q}:x` → `{:Q}:x`, `P:x` → `:x`; `None` if not under it.
fn relative(key: &[u8], prefix: &str) -> Option<Vec<u8>> {
    let p = prefix.as_bytes();
    if key.len() > p.len() + 1
        && key[0] == b'{'
        && &key[1..=p.len()] == p
        && key[p.len() + 1] == b':'
    {
        let mut out = vec![b'{'];
        out.extend_from_slice(&key[p.len() + 1..]);
        return Some(out);
    }
    if key.len() > p.len() && &key[..p.len()] == p && key[p.len()] == b':' {
        return Some(key[p.len()..].to_vec());
    }
    None
}

/// `relative` under `prefix`.
fn absolute(relative: &[u8], prefix: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(relative.len() + prefix.len());
    if relative.first() == Some(&b'{') {
        out.push(b'{');
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(&relative[1..]);
    } else {
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(relative);
    }
    out
}

/// The role of a key: the first part after the queue's hash tag or the prefix (`jobs` for
/// the job hashes).
fn role(relative: &[u8]) -> String {
    let rest = match relative.windows(2).position(|w| w == b"}:") {
        Some(i) if relative.first() == Some(&b'{') => &relative[i + 2..],
        _ => relative.strip_prefix(b":").unwrap_or(relative),
    };
    let part = rest.split(|b| *b == b':').next().unwrap_or_default();
    match part {
        b"job" => "jobs".into(),
        other => String::from_utf8_lossy(other).into_owned(),
    }
}

/// Counts and checksums per role and per type.
#[derive(Default)]
pub(crate) struct Figures {
    tables: BTreeMap<String, (u64, u64)>,
}

impl Figures {
    fn add(&mut self, relative: &[u8], kind: &str, content: &[u8; 32]) {
        let mut h = sha2::Sha256::new();
        h.update(relative);
        h.update([0]);
        h.update(content);
        let digest = h.finalize();
        let value = u64::from_be_bytes(digest[..8].try_into().unwrap_or_default());
        for table in [role(relative), format!("type:{kind}")] {
            let e = self.tables.entry(table).or_default();
            e.0 += 1;
            e.1 = e.1.wrapping_add(value);
        }
    }

    pub(crate) fn into_tables(self) -> Vec<TableFigures> {
        self.tables
            .into_iter()
            .map(|(table, (rows, sum))| TableFigures {
                table,
                rows,
                checksum: Some(format!("{sum:016x}")),
            })
            .collect()
    }
}

pub(crate) async fn connect(name: &str, url: &str) -> Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url).map_err(|e| Error::source(name, e))?;
    client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| Error::source(name, format!("connecting: {e}")))
}

/// One key read: its name, type, remaining TTL in ms (0: none), `DUMP` payload and content
/// digest.
type KeyDump = (Vec<u8>, String, i64, Vec<u8>, [u8; 32]);

fn flatten(v: &redis::Value, out: &mut Vec<Vec<u8>>) {
    use redis::Value as V;
    match v {
        V::BulkString(b) => out.push(b.clone()),
        V::SimpleString(s) => out.push(s.as_bytes().to_vec()),
        V::Array(items) | V::Set(items) => items.iter().for_each(|i| flatten(i, out)),
        V::Map(pairs) => pairs.iter().for_each(|(k, v)| {
            flatten(k, out);
            flatten(v, out);
        }),
        V::Nil => {}
        other => out.push(format!("{other:?}").into_bytes()),
    }
}

/// A digest of a key's content that does not depend on how Redis encodes it: a hash's fields
/// and a set's members sorted, a sorted set's and a list's in their order.
fn digest(kind: &str, content: &redis::Value) -> [u8; 32] {
    let mut items = Vec::new();
    flatten(content, &mut items);
    match kind {
        "hash" => {
            let mut pairs: Vec<Vec<u8>> = items
                .chunks(2)
                .map(|p| {
                    let mut joined = p[0].clone();
                    joined.push(0);
                    if let Some(v) = p.get(1) {
                        joined.extend_from_slice(v);
                    }
                    joined
                })
                .collect();
            pairs.sort();
            items = pairs;
        }
        "set" => items.sort(),
        _ => {}
    }
    let mut h = sha2::Sha256::new();
    h.update(kind.as_bytes());
    for i in &items {
        h.update((i.len() as u64).to_be_bytes());
        h.update(i);
    }
    h.finalize().into()
}

/// Every key under a prefix, in batches (keys deleted between the steps are left out; a key
/// `SCAN` returns twice is given once).
struct Scanner {
    patterns: Vec<String>,
    index: usize,
    cursor: u64,
    seen: HashSet<[u8; 16]>,
}

impl Scanner {
    fn new(prefix: &str) -> Self {
        Self {
            patterns: vec![format!("{prefix}:*"), format!("{{{prefix}:*")],
            index: 0,
            cursor: 0,
            seen: HashSet::new(),
        }
    }

    /// The next batch of keys not given before; `None` once every pattern is scanned.
    async fn next_keys(
        &mut self,
        con: &mut redis::aio::MultiplexedConnection,
    ) -> redis::RedisResult<Option<Vec<Vec<u8>>>> {
        loop {
            let Some(pattern) = self.patterns.get(self.index) else {
                return Ok(None);
            };
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(self.cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(BATCH)
                .query_async(con)
                .await?;
            self.cursor = next;
            if next == 0 {
                self.index += 1;
            }
            let seen = &mut self.seen;
            let keys: Vec<Vec<u8>> = keys
                .into_iter()
                .filter(|k| {
                    let d = sha2::Sha256::digest(k);
                    seen.insert(d[..16].try_into().unwrap_or_default())
                })
                .collect();
            if !keys.is_empty() {
                return Ok(Some(keys));
            }
        }
    }

    async fn next_batch(
        &mut self,
        con: &mut redis::aio::MultiplexedConnection,
    ) -> redis::RedisResult<Option<Vec<KeyDump>>> {
        loop {
            let Some(keys) = self.next_keys(con).await? else {
                return Ok(None);
            };
            let mut types = redis::pipe();
            let mut ttls = redis::pipe();
            let mut dumps = redis::pipe();
            for k in &keys {
                types.cmd("TYPE").arg(k);
                ttls.cmd("PTTL").arg(k);
                dumps.cmd("DUMP").arg(k);
            }
            let types: Vec<String> = types.query_async(con).await?;
            let mut contents = redis::pipe();
            for (k, t) in keys.iter().zip(&types) {
                match t.as_str() {
                    "string" => contents.cmd("GET").arg(k),
                    "hash" => contents.cmd("HGETALL").arg(k),
                    "set" => contents.cmd("SMEMBERS").arg(k),
                    "zset" => contents
                        .cmd("ZRANGE")
                        .arg(k)
                        .arg(0)
                        .arg(-1)
                        .arg("WITHSCORES"),
                    "list" => contents.cmd("LRANGE").arg(k).arg(0).arg(-1),
                    _ => contents.cmd("DUMP").arg(k),
                };
            }
            let ttls: Vec<i64> = ttls.query_async(con).await?;
            let dumps: Vec<Option<Vec<u8>>> = dumps.query_async(con).await?;
            let contents: Vec<redis::Value> = contents.query_async(con).await?;
            let batch: Vec<KeyDump> = keys
                .into_iter()
                .zip(types)
                .zip(ttls)
                .zip(dumps)
                .zip(contents)
                .filter_map(|((((k, t), ttl), d), c)| {
                    let payload = d?;
                    let digest = digest(&t, &c);
                    (t != "none" && ttl != -2).then(|| (k, t, ttl.max(0), payload, digest))
                })
                .collect();
            if !batch.is_empty() {
                return Ok(Some(batch));
            }
        }
    }
}

async fn write_record<W: AsyncWrite + Unpin>(
    w: &mut W,
    relative: &[u8],
    ttl: i64,
    payload: &[u8],
) -> std::io::Result<()> {
    w.write_all(&(relative.len() as u32).to_be_bytes()).await?;
    w.write_all(relative).await?;
    w.write_all(&ttl.to_be_bytes()).await?;
    w.write_all(&(payload.len() as u32).to_be_bytes()).await?;
    w.write_all(payload).await
}

/// The running dump's end: the figures of what was written.
pub(crate) type Running = tokio::task::JoinHandle<Result<Vec<TableFigures>>>;

pub(super) async fn dump(name: &str, url: &str) -> Result<Dump> {
    let (conn_url, prefix) = split(url)?;
    let mut con = connect(name, &conn_url).await?;
    let (mut w, r) = tokio::io::duplex(1 << 20);
    let source = name.to_string();
    let task: Running = tokio::spawn(async move {
        let fail = |e: String| Error::source(&source, e);
        w.write_all(HEADER).await.map_err(|e| fail(e.to_string()))?;
        let mut figures = Figures::default();
        let mut scanner = Scanner::new(&prefix);
        while let Some(batch) = scanner
            .next_batch(&mut con)
            .await
            .map_err(|e| fail(format!("reading keys under `{prefix}`: {e}")))?
        {
            for (key, kind, ttl, payload, content) in batch {
                let Some(rel) = relative(&key, &prefix) else {
                    continue;
                };
                figures.add(&rel, &kind, &content);
                write_record(&mut w, &rel, ttl, &payload)
                    .await
                    .map_err(|e| fail(format!("writing the dump: {e}")))?;
            }
        }
        w.write_all(&0u32.to_be_bytes())
            .await
            .map_err(|e| fail(e.to_string()))?;
        w.shutdown().await.map_err(|e| fail(e.to_string()))?;
        Ok(figures.into_tables())
    });
    Ok(Dump {
        reader: Box::new(r),
        tables: Vec::new(),
        migrations: Vec::new(),
        finish: Finish::Redis(task),
    })
}

/// Whether any key lives under `prefix`.
pub(crate) async fn has_keys(
    con: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> redis::RedisResult<bool> {
    Ok(Scanner::new(prefix).next_keys(con).await?.is_some())
}

/// Deletes every key under `prefix`.
pub(crate) async fn delete_all(
    con: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> redis::RedisResult<u64> {
    let mut deleted = 0;
    let mut scanner = Scanner::new(prefix);
    while let Some(keys) = scanner.next_keys(con).await? {
        let n: u64 = redis::cmd("UNLINK").arg(&keys).query_async(con).await?;
        deleted += n;
    }
    Ok(deleted)
}

/// The figures of the keys under `prefix` now.
pub(crate) async fn figures(
    con: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> redis::RedisResult<Vec<TableFigures>> {
    let mut figures = Figures::default();
    let mut scanner = Scanner::new(prefix);
    while let Some(batch) = scanner.next_batch(con).await? {
        for (key, kind, _ttl, _payload, content) in batch {
            if let Some(rel) = relative(&key, prefix) {
                figures.add(&rel, &kind, &content);
            }
        }
    }
    Ok(figures.into_tables())
}

/// Reads the records of a dump from `r` and `RESTORE`s each under `prefix` (replacing a key
/// of the same name). Returns how many keys were restored.
pub(crate) async fn load<R: AsyncRead + Unpin>(
    r: &mut R,
    con: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> std::result::Result<u64, String> {
    let mut header = [0u8; HEADER.len()];
    r.read_exact(&mut header)
        .await
        .map_err(|e| format!("reading the header: {e}"))?;
    if header != HEADER {
        return Err("the data is not a Conveyor Redis dump".into());
    }
    let mut restored = 0u64;
    let mut pipe = redis::pipe();
    let mut queued = 0usize;
    loop {
        let len = r
            .read_u32()
            .await
            .map_err(|e| format!("the dump ends early: {e}"))? as usize;
        if len == 0 {
            break;
        }
        let mut key = vec![0u8; len];
        r.read_exact(&mut key)
            .await
            .map_err(|e| format!("the dump ends early: {e}"))?;
        let ttl = r
            .read_i64()
            .await
            .map_err(|e| format!("the dump ends early: {e}"))?;
        let plen = r
            .read_u32()
            .await
            .map_err(|e| format!("the dump ends early: {e}"))? as usize;
        let mut payload = vec![0u8; plen];
        r.read_exact(&mut payload)
            .await
            .map_err(|e| format!("the dump ends early: {e}"))?;
        pipe.cmd("RESTORE")
            .arg(absolute(&key, prefix))
            .arg(ttl)
            .arg(payload)
            .arg("REPLACE")
            .ignore();
        queued += 1;
        if queued == BATCH {
            pipe.query_async::<()>(con)
                .await
                .map_err(|e| format!("RESTORE failed: {e}"))?;
            restored += queued as u64;
            pipe = redis::pipe();
            queued = 0;
        }
    }
    if queued > 0 {
        pipe.query_async::<()>(con)
            .await
            .map_err(|e| format!("RESTORE failed: {e}"))?;
        restored += queued as u64;
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_move_between_prefixes() {
        for (key, rel) in [
            (&b"{conveyor:default}:job:1"[..], &b"{:default}:job:1"[..]),
            (b"conveyor:index", b":index"),
            (b"{conveyor:a:b}:ready", b"{:a:b}:ready"),
        ] {
            assert_eq!(relative(key, "conveyor").as_deref(), Some(rel));
            assert_eq!(
                absolute(rel, "other"),
                String::from_utf8_lossy(key)
                    .replace("conveyor", "other")
                    .into_bytes()
            );
        }
        assert_eq!(relative(b"conveyor2:index", "conveyor"), None);
        assert_eq!(relative(b"{conveyor2:q}:ready", "conveyor"), None);
        assert_eq!(role(b"{:a:b}:job:01"), "jobs");
        assert_eq!(role(b"{:q}:hist:01"), "hist");
        assert_eq!(role(b":index"), "index");
        assert_eq!(role(b":key:abc"), "key");
    }
}
