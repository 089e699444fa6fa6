//! A job as Redis keeps it: the hash's fields and the history string read back into a
//! [`Job`], times as microseconds, and the ready set's score.

use std::collections::HashMap;
use std::time::Duration;

use ::redis::Pipeline;
use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::job::{AttemptRecord, Job, JobId};

/// Adds a ready job's score in `{P:Q}:ready` to `cmd`, as `ready_score` in `prelude.lua`
/// computes it: priority · 10¹³ + run_at in whole milliseconds (clamped to 13 digits), in
/// double precision. Up to priority ±900 the sum is an integer below 2⁵³, sent as one.
pub(super) fn ready_score(cmd: &mut ::redis::Cmd, priority: i16, run_at: DateTime<Utc>) {
    let ms = run_at
        .timestamp_micros()
        .div_euclid(1000)
        .clamp(0, 9_999_999_999_999);
    let score = f64::from(priority) * 1e13 + ms as f64;
    if score.abs() < 9.0e15 {
        cmd.arg(score as i64);
    } else {
        cmd.arg(score);
    }
}

pub(super) fn micros(t: DateTime<Utc>) -> String {
    t.timestamp_micros().to_string()
}

pub(super) fn after(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    crate::store::after(now, d)
}

/// A lease length in whole microseconds, added to the server's clock in the scripts.
/// Capped by [`crate::store::lease_length`], so the deadline stays one the store reads back.
pub(super) fn lease_micros(d: Duration) -> String {
    crate::store::lease_length(d).as_micros().to_string()
}

pub(super) fn before(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    crate::store::before(now, d)
}

/// Adds the reads of one job to `pipe`: its hash, then its attempt history.
pub(super) fn read_job(pipe: &mut Pipeline, base: &str, id: impl std::fmt::Display) {
    pipe.cmd("HGETALL")
        .arg(format!("{base}:job:{id}"))
        .cmd("GET")
        .arg(format!("{base}:hist:{id}"));
}

/// A job from its hash's field/value list and its history (one JSON record per line). The
/// id and queue come from the hash's key; fields left out at enqueue take their defaults (no
/// key, no tags, `{}`, no attempts). Jobs written before the history had a key of its own
/// hold their earlier attempts as a JSON array in the hash's `attempts` field.
pub(super) fn job_from_fields(
    queue: &str,
    id: JobId,
    flat: Vec<String>,
    history: Option<String>,
) -> Result<Job> {
    let mut map: HashMap<String, String> = HashMap::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        map.insert(k, v);
    }
    let corrupt = |field: &str| {
        Error::Unsupported(format!("stored job {id} is missing or has a bad `{field}`"))
    };
    let text = |field: &str| map.get(field).cloned().ok_or_else(|| corrupt(field));
    let int = |field: &str| -> Result<i64> {
        map.get(field)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| corrupt(field))
    };
    let time = |field: &str| -> Result<Option<DateTime<Utc>>> {
        match map.get(field) {
            None => Ok(None),
            Some(v) => v
                .parse::<i64>()
                .ok()
                .and_then(DateTime::from_timestamp_micros)
                .map(Some)
                .ok_or_else(|| corrupt(field)),
        }
    };
    let required = |field: &str| time(field)?.ok_or_else(|| corrupt(field));
    Ok(Job {
        id,
        queue: queue.to_string(),
        kind: text("kind")?,
        args: serde_json::from_str(&text("args")?)?,
        priority: i16::try_from(int("priority")?).map_err(|_| corrupt("priority"))?,
        state: text("state")?.parse()?,
        attempt: i32::try_from(int("attempt")?).map_err(|_| corrupt("attempt"))?,
        max_attempts: i32::try_from(int("max_attempts")?).map_err(|_| corrupt("max_attempts"))?,
        run_at: required("run_at")?,
        created_at: required("created_at")?,
        attempted_at: time("attempted_at")?,
        finalized_at: time("finalized_at")?,
        lease_owner: map.get("lease_owner").cloned(),
        lease_expires_at: time("lease_expires_at")?,
        cancel_requested_at: time("cancel_requested_at")?,
        idempotency_key: map.get("idempotency_key").cloned(),
        tags: match map.get("tags") {
            Some(v) => serde_json::from_str(v)?,
            None => Vec::new(),
        },
        metadata: match map.get("metadata") {
            Some(v) => serde_json::from_str(v)?,
            None => serde_json::Value::Object(Default::default()),
        },
        attempts: {
            let mut attempts = match map.get("attempts") {
                Some(v) => serde_json::from_str::<Vec<AttemptRecord>>(v)?,
                None => Vec::new(),
            };
            for line in history.as_deref().unwrap_or_default().lines() {
                attempts.push(serde_json::from_str(line)?);
            }
            attempts
        },
        result: map
            .get("result")
            .map(|v| serde_json::from_str(v))
            .transpose()?,
        progress: map
            .get("progress")
            .map(|v| serde_json::from_str(v))
            .transpose()?,
    })
}
