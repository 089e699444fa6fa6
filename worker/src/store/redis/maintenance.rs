//! The maintenance passes: promote due scheduled and retryable jobs, rescue jobs whose lease
//! expired, prune finished jobs past their retention.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::codec::*;
use super::script::*;
use super::{CHUNK, RedisStore};
use crate::error::Result;
use crate::job::JobId;
use crate::retry_policy::RetryPolicy;
use crate::store::{RescueReport, RetentionPolicy, rescue_finish};

impl RedisStore {
    pub(super) async fn promote(&self, now: DateTime<Utc>, limit: u32) -> Result<u64> {
        let mut left = limit as usize;
        let mut n = 0u64;
        for queue in self.queues().await? {
            let base = self.keys.queue(&queue);
            while left > 0 {
                let step = left.min(CHUNK);
                let moved: u64 = self
                    .eval(
                        PROMOTE
                            .key(format!("{base}:delayed"))
                            .arg(&base)
                            .arg(micros(now))
                            .arg(step)
                            .arg(self.keys.jobs_channel())
                            .arg(&queue),
                    )
                    .await?;
                n += moved;
                left -= moved as usize;
                if moved > 0 {
                    self.wake([queue.clone()]);
                }
                if (moved as usize) < step {
                    break;
                }
            }
            if left == 0 {
                break;
            }
        }
        Ok(n)
    }

    pub(super) async fn rescue(
        &self,
        now: DateTime<Utc>,
        policy: &RetryPolicy,
        limit: u32,
    ) -> Result<RescueReport> {
        let mut report = RescueReport::default();
        let mut left = limit as usize;
        for queue in self.queues().await? {
            if left == 0 {
                break;
            }
            let base = self.keys.queue(&queue);
            let flat: Vec<String> = self
                .eval(
                    RESCUE_SCAN
                        .key(format!("{base}:leases"))
                        .arg(&base)
                        .arg(micros(now))
                        .arg(left.min(CHUNK)),
                )
                .await?;
            let mut finishes = Vec::new();
            for row in flat.chunks(6) {
                let [id, attempt, max, started, owner, cancel] = row else {
                    continue;
                };
                let started = started
                    .parse::<i64>()
                    .ok()
                    .and_then(DateTime::from_timestamp_micros)
                    .unwrap_or(now);
                finishes.push(rescue_finish(
                    id.parse()?,
                    attempt.parse().unwrap_or(0),
                    max.parse().unwrap_or(1),
                    (!owner.is_empty()).then(|| owner.clone()),
                    started,
                    !cancel.is_empty(),
                    now,
                    policy,
                ));
            }
            if finishes.is_empty() {
                continue;
            }
            // Another rescuer may have taken some since the scan, or a heartbeat renewed
            // them: only the outcomes that applied are counted.
            let applied: BTreeSet<JobId> = self
                .apply(&finishes, Some(now))
                .await?
                .into_iter()
                .collect();
            for f in finishes.iter().filter(|f| applied.contains(&f.id)) {
                report.count(f);
            }
            left = left.saturating_sub(applied.len());
        }
        Ok(report)
    }

    pub(super) async fn prune_finished(
        &self,
        now: DateTime<Utc>,
        policy: &RetentionPolicy,
        limit: u32,
    ) -> Result<u64> {
        let cut = |d: Duration| micros(before(now, d));
        let keyed = |d: Duration| micros(before(now, d.max(policy.idempotency)));
        let mut left = limit as usize;
        let mut n = 0u64;
        for queue in self.queues().await? {
            let base = self.keys.queue(&queue);
            while left > 0 {
                let step = left.min(CHUNK);
                let flat: Vec<String> = self
                    .eval(
                        PRUNE
                            .key(format!("{base}:ready"))
                            .arg(&base)
                            .arg(step)
                            .arg(cut(policy.completed))
                            .arg(cut(policy.cancelled))
                            .arg(cut(policy.dead))
                            .arg(keyed(policy.completed))
                            .arg(keyed(policy.cancelled))
                            .arg(keyed(policy.dead)),
                    )
                    .await?;
                let deleted = flat
                    .chunks(2)
                    .map(|p| Ok((queue.clone(), p[0].parse()?, p[1].clone())))
                    .collect::<Result<Vec<(String, JobId, String)>>>()?;
                self.forget(&deleted).await?;
                n += deleted.len() as u64;
                left -= deleted.len();
                if deleted.len() < step {
                    break;
                }
            }
            if left == 0 {
                break;
            }
        }
        Ok(n)
    }
}

impl RedisStore {
    /// [`crate::Store::finished_groups`]: each queue's six finished sets read by
    /// `finished.lua` in chunks of [`CHUNK`] jobs, summarised in the server so only the
    /// counts cross the network, and no script runs long.
    pub(super) async fn finished(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<crate::stats::FinishedGroup>> {
        use crate::job::JobState;
        use crate::stats::GroupBuilder;
        let mut groups = GroupBuilder::default();
        for queue in self.queues().await? {
            let base = self.keys.queue(&queue);
            for state in [JobState::Completed, JobState::Cancelled, JobState::Dead] {
                for set in ["fin", "fink"] {
                    let set = format!("{set}:{state}");
                    let (mut at, mut skip) = (micros(from), 0u64);
                    let micros_from = |us: i64| us.to_string();
                    loop {
                        let flat: Vec<String> = self
                            .eval(
                                FINISHED
                                    .key(format!("{base}:ready"))
                                    .arg(&base)
                                    .arg(&set)
                                    .arg(state.to_string())
                                    .arg(at)
                                    .arg(micros(to))
                                    .arg(CHUNK)
                                    .arg(skip),
                            )
                            .await?;
                        let [read, next_at, next_skip, pairs @ ..] = flat.as_slice() else {
                            return Err(bad_answer(format!("{} values", flat.len())));
                        };
                        for p in pairs.chunks(2) {
                            let [key, n] = p else { continue };
                            let mut parts = key.split('\t');
                            let kind = parts.next().unwrap_or_default();
                            let bucket = |s: Option<&str>| s.and_then(|s| s.parse::<i32>().ok());
                            let rb = bucket(parts.next());
                            let wb = bucket(parts.next());
                            let n = n.parse().map_err(|_| bad_answer(format!("count {n:?}")))?;
                            groups.add(&queue, kind, state, rb, wb, n);
                        }
                        let number = |s: &String| {
                            s.parse::<i64>()
                                .map_err(|_| bad_answer(format!("number {s:?}")))
                        };
                        if number(read)? < CHUNK as i64 {
                            break;
                        }
                        at = micros_from(number(next_at)?);
                        skip = number(next_skip)? as u64;
                    }
                }
            }
        }
        Ok(groups.finish())
    }
}

/// An answer of `finished.lua` that is not what it writes.
fn bad_answer(what: String) -> crate::Error {
    crate::Error::Corrupt(<serde_json::Error as serde::de::Error>::custom(format!(
        "finished.lua answered an unexpected {what}"
    )))
}
