//! Idempotency keys: claimed before an insert, confirmed after it, freed with their job (see
//! "Idempotency keys" in the parent module's doc), and the id index entries of deleted jobs.

use std::time::Duration;

use ::redis::Pipeline;
use futures::StreamExt;

use super::enqueue::*;
use super::script::*;
use super::{CHUNK, RedisStore};
use crate::error::{Error, Result};
use crate::job::{Enqueued, JobId};

/// How long an idempotency key claim lasts if its insert never confirms it.
pub(super) const CLAIM_MS: u64 = 60_000;
/// How long an enqueue waits for another enqueue's claim on the same key to be confirmed.
pub(super) const CLAIM_WAIT: Duration = Duration::from_secs(5);

impl RedisStore {
    /// Claims the idempotency keys of `which` jobs. Per job: `None` when claimed (insert it),
    /// or the holder's answer (a duplicate).
    pub(super) async fn claim_keys(
        &self,
        batch: &Incoming<'_>,
        which: &[usize],
    ) -> Result<Vec<Option<Enqueued>>> {
        if which.is_empty() {
            return Ok(Vec::new());
        }
        let value = |i: usize| batch.holder(i);
        let key = |i: usize| self.keys.idempotency(batch.key(i));
        let pipes: Vec<Pipeline> = which
            .chunks(CHUNK)
            .map(|chunk| {
                let mut pipe = ::redis::pipe();
                for &i in chunk {
                    pipe.cmd("SET")
                        .arg(key(i))
                        .arg(value(i))
                        .arg("NX")
                        .arg("PX")
                        .arg(CLAIM_MS);
                }
                pipe
            })
            .collect();
        let sends: Vec<_> = pipes.iter().map(|pipe| self.run(pipe)).collect();
        let answers: Vec<Result<Vec<Option<String>>>> = futures::stream::iter(sends)
            .buffered(IN_FLIGHT)
            .collect()
            .await;
        let mut out = Vec::with_capacity(which.len());
        let mut won = Vec::with_capacity(which.len());
        for answer in answers {
            won.extend(answer?.into_iter().map(|a| a.is_some()));
        }
        for (&i, won) in which.iter().zip(won) {
            if won {
                out.push(None);
            } else {
                out.push(self.settle_key(&key(i), &value(i)).await?);
            }
        }
        Ok(out)
    }

    /// Resolves a lost claim: the holder's answer, or `None` once the key was won after all
    /// (its holder had gone).
    pub(super) async fn settle_key(&self, key: &str, value: &str) -> Result<Option<Enqueued>> {
        let deadline = tokio::time::Instant::now() + CLAIM_WAIT;
        loop {
            let mut pipe = ::redis::pipe();
            pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
            let (holder, ttl): (Option<String>, i64) = self.run(&pipe).await?;
            if let Some((queue, id)) = holder.as_deref().and_then(|h| h.split_once('/')) {
                let id: JobId = id.parse()?;
                let mut conn = self.conn.clone();
                let state: Option<String> = ::redis::cmd("HGET")
                    .arg(format!("{}:job:{id}", self.keys.queue(queue)))
                    .arg("state")
                    .query_async(&mut conn)
                    .await?;
                if let Some(state) = state {
                    if ttl >= 0 {
                        // The job exists but its claim was never confirmed (an insert whose
                        // answer was lost): confirm it now, before it expires.
                        self.eval::<i64>(KEY_KEEP.key(key).arg(holder.as_deref()))
                            .await?;
                    }
                    return Ok(Some(Enqueued {
                        id,
                        state: state.parse()?,
                        duplicate: true,
                    }));
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(Error::Unsupported(format!(
                        "idempotency key `{}` is claimed by an enqueue that has not finished; try again",
                        key.strip_prefix(&format!("{}:key:", self.keys.prefix))
                            .unwrap_or(key)
                    )));
                }
                if ttl == -1 {
                    // Confirmed, yet its job is gone: deleted before the key could be freed.
                    self.eval::<i64>(KEY_FREE.key(key).arg(holder.as_deref()))
                        .await?;
                } else {
                    // Another enqueue claimed it and is inserting its job right now.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            let mut conn = self.conn.clone();
            let won: Option<String> = ::redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("NX")
                .arg("PX")
                .arg(CLAIM_MS)
                .query_async(&mut conn)
                .await?;
            if won.is_some() {
                return Ok(None);
            }
        }
    }

    /// Frees claims made by an enqueue that then failed (only those this call still holds).
    pub(super) async fn release_claims(&self, batch: &Incoming<'_>, claimed: &[usize]) {
        if claimed.is_empty() {
            return;
        }
        let mut pipe = ::redis::pipe();
        for &i in claimed {
            pipe.invoke_script(
                KEY_FREE
                    .key(self.keys.idempotency(batch.key(i)))
                    .arg(batch.holder(i)),
            )
            .ignore();
        }
        if let Err(e) = self.run::<()>(&pipe).await {
            tracing::warn!(error = %e, "could not free idempotency key claims; they expire in a minute");
        }
    }

    /// After a failed insert: confirms the claims of `claimed` jobs that exist after all.
    pub(super) async fn confirm_existing(&self, batch: &Incoming<'_>, claimed: &[usize]) {
        let attempt = async {
            for chunk in claimed.chunks(CHUNK) {
                let mut pipe = ::redis::pipe();
                for &i in chunk {
                    pipe.cmd("EXISTS").arg(format!(
                        "{}:job:{}",
                        self.keys.queue(&batch.jobs[i].queue),
                        batch.id_text[i]
                    ));
                }
                let exists: Vec<bool> = self.run(&pipe).await?;
                let mut pipe = ::redis::pipe();
                for (&i, _) in chunk.iter().zip(exists).filter(|(_, e)| *e) {
                    pipe.invoke_script(
                        KEY_KEEP
                            .key(self.keys.idempotency(batch.key(i)))
                            .arg(batch.holder(i)),
                    )
                    .ignore();
                }
                self.run::<()>(&pipe).await?;
            }
            Ok::<(), Error>(())
        };
        if let Err(e) = attempt.await {
            tracing::warn!(error = %e, "could not check the key claims of a failed enqueue; a retry of it confirms them");
        }
    }

    /// Removes deleted jobs from the global index and frees their idempotency keys.
    pub(super) async fn forget(&self, deleted: &[(String, JobId, String)]) -> Result<()> {
        if deleted.is_empty() {
            return Ok(());
        }
        for chunk in deleted.chunks(CHUNK) {
            let mut pipe = ::redis::pipe();
            let mut hdel = ::redis::cmd("HDEL");
            hdel.arg(self.keys.index());
            for (_, id, _) in chunk {
                hdel.arg(id.to_string());
            }
            pipe.add_command(hdel).ignore();
            for (queue, id, key) in chunk.iter().filter(|(_, _, k)| !k.is_empty()) {
                pipe.invoke_script(
                    KEY_FREE
                        .key(self.keys.idempotency(key))
                        .arg(format!("{queue}/{id}")),
                )
                .ignore();
            }
            self.run::<()>(&pipe).await?;
        }
        Ok(())
    }
}
