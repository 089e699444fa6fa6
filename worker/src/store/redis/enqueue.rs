//! Enqueue: a batch cut into parts of one queue, each part's key claims, its caller-chosen
//! ids reserved, then one `MULTI` that writes its jobs and indexes, with what to undo or
//! repair when Redis refuses part of it (see `RedisStore::insert`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};

use ::redis::Pipeline;
use chrono::{DateTime, Utc};
use futures::StreamExt;

use super::codec::*;
use super::{CHUNK, RedisStore};
use crate::error::{Error, Result};
use crate::job::{Enqueued, JobId, JobState, NewJob};

/// Pipelines one bulk enqueue keeps in flight at once.
pub(super) const IN_FLIGHT: usize = 4;
/// Jobs per part of a bulk enqueue (see `RedisStore::insert`).
pub(super) const ENQUEUE_PART: usize = 250;

impl RedisStore {
    /// Claims keys and caller-chosen ids, then inserts. See [`Store::enqueue_many`].
    ///
    /// The batch is cut into parts of at most [`ENQUEUE_PART`] jobs of one queue. Each part
    /// takes two round trips (its key claims, then its insert), and up to [`IN_FLIGHT`] parts
    /// are under way at once on the one connection, so the server works on one part while
    /// the client prepares the next.
    ///
    /// A call that fails may have been applied in part: parts that completed, and parts whose
    /// insert reached Redis but whose answer was lost (the connection dropped). Repeating the
    /// call is safe for jobs with a key: if a part's claims lost their answer, its claims were
    /// freed here; if an insert's answer was lost, its jobs exist and the retry gets them
    /// back as duplicates (and confirms their claims); jobs of parts never sent are inserted
    /// by the retry. Jobs without a key are inserted again; a caller-chosen id makes such a
    /// retry fail with "already exists" instead.
    pub(super) async fn insert(&self, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>> {
        for job in &jobs {
            job.validate()?;
        }
        // Whether a job is due is decided on the server's clock (estimated here, measured
        // again every few seconds), not on this machine's.
        let now = self.clock_now().await?;
        let batch = Incoming::new(&jobs, now);
        // Duplicates within the batch follow the first job with their key.
        let mut first_with_key: HashMap<&str, usize> = HashMap::new();
        let mut follows: Vec<(usize, usize)> = Vec::new();
        let mut by_queue: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, job) in jobs.iter().enumerate() {
            if let Some(key) = job.idempotency_key.as_deref() {
                if let Some(&first) = first_with_key.get(key) {
                    follows.push((i, first));
                    continue;
                }
                first_with_key.insert(key, i);
            }
            by_queue.entry(job.queue.as_str()).or_default().push(i);
        }
        let parts: Vec<(&str, &[usize])> = by_queue
            .iter()
            .flat_map(|(queue, members)| members.chunks(ENQUEUE_PART).map(move |c| (*queue, c)))
            .collect();
        // Once a part fails, parts not yet started are not started: the call fails anyway,
        // and what it leaves applied stays as small as it can.
        let failing = AtomicBool::new(false);
        let sends: Vec<_> = parts
            .iter()
            .map(|&(queue, part)| {
                let failing = &failing;
                let batch = &batch;
                async move {
                    if failing.load(Ordering::Relaxed) {
                        return Err(None);
                    }
                    let result = self.insert_part(batch, queue, part).await;
                    if result.is_err() {
                        failing.store(true, Ordering::Relaxed);
                    }
                    result.map_err(Some)
                }
            })
            .collect();
        let results: Vec<PartResult> = futures::stream::iter(sends)
            .buffered(IN_FLIGHT)
            .collect()
            .await;
        let mut answers: Vec<Option<Enqueued>> = vec![None; jobs.len()];
        let mut woken = Vec::new();
        let mut failed = None;
        for (&(queue, _), result) in parts.iter().zip(results) {
            match result {
                Ok(done) => {
                    for (i, answer) in done {
                        if !answer.duplicate && answer.state == JobState::Available {
                            woken.push(queue.to_string());
                        }
                        answers[i] = Some(answer);
                    }
                }
                Err(Some(e)) => {
                    failed.get_or_insert(e);
                }
                Err(None) => {}
            }
        }
        woken.dedup();
        self.wake(woken);
        if let Some(e) = failed {
            let stored = answers.iter().filter(|a| a.is_some()).count();
            return Err(match e {
                Error::StoreFull(msg) if stored > 0 => Error::StoreFull(format!(
                    "{msg}. {stored} of the {} jobs of this enqueue were stored (or found to exist) before that; once Redis has room, sending the same jobs again returns those with an idempotency key as duplicates and enqueues jobs without one a second time",
                    jobs.len()
                )),
                e => e,
            });
        }
        for (i, first) in follows {
            answers[i] = answers[first].clone().map(|a| Enqueued {
                duplicate: true,
                ..a
            });
        }
        answers
            .into_iter()
            .map(|a| a.ok_or_else(|| Error::Unsupported("enqueue left a job unanswered".into())))
            .collect()
    }

    /// One part of a batch (jobs of one queue): claims its keys, reserves its caller-chosen
    /// ids, inserts the jobs that are not duplicates. Returns an answer per job of the part.
    pub(super) async fn insert_part(
        &self,
        batch: &Incoming<'_>,
        queue: &str,
        part: &[usize],
    ) -> Result<Vec<(usize, Enqueued)>> {
        let jobs = batch.jobs;
        let keyed: Vec<usize> = part
            .iter()
            .copied()
            .filter(|&i| jobs[i].idempotency_key.is_some())
            .collect();
        let held = match self.claim_keys(batch, &keyed).await {
            Ok(held) => held,
            Err(e) => {
                // The claims may have been applied and only their answer lost: free the
                // ones this call made, so a retry of the call is not kept waiting.
                self.release_claims(batch, &keyed).await;
                return Err(e);
            }
        };
        let mut out = Vec::with_capacity(part.len());
        let mut claimed = Vec::new();
        let mut duplicates = BTreeSet::new();
        for (&i, holder) in keyed.iter().zip(held) {
            match holder {
                None => claimed.push(i),
                Some(answer) => {
                    duplicates.insert(i);
                    out.push((i, answer));
                }
            }
        }
        let inserting: Vec<usize> = part
            .iter()
            .copied()
            .filter(|i| !duplicates.contains(i))
            .collect();
        if let Err(e) = self.reserve_ids(batch, &inserting).await {
            self.release_claims(batch, &claimed).await;
            return Err(e);
        }
        if inserting.is_empty() {
            return Ok(out);
        }
        let pipe = self.insert_pipeline(batch, queue, &inserting)?;
        self.run_insert(&pipe, batch, queue, &inserting, &claimed)
            .await?;
        out.extend(inserting.into_iter().map(|i| {
            (
                i,
                Enqueued {
                    id: batch.ids[i],
                    state: batch.states[i],
                    duplicate: false,
                },
            )
        }));
        Ok(out)
    }

    /// One part's insert: queue registry and id index, then one `MULTI` with the jobs'
    /// hashes and their state indexes (plain writes of new keys: nothing to decide, so no
    /// script), then the confirmations of the part's key claims (a claim expires unless
    /// confirmed). The ids are new (generated, or reserved by [`Self::reserve_ids`]).
    pub(super) fn insert_pipeline(
        &self,
        batch: &Incoming<'_>,
        queue: &str,
        part: &[usize],
    ) -> Result<Pipeline> {
        let (jobs, ids) = (batch.jobs, &batch.id_text);
        let base = self.keys.queue(queue);
        let mut pipe = ::redis::pipe();
        // Every reply comes back, errors included: `run_insert` tells from them what applied.
        pipe.ignore_errors();
        for cmd in self.registry_writes(batch, queue, part) {
            pipe.add_command(cmd);
        }
        // Inside the transaction every reply is kept too: a command Redis refuses as it is
        // queued (out of memory) is why the whole transaction is then refused.
        pipe.cmd("MULTI").ignore();
        // Sized up front: each member is an id of 36 bytes and a score of up to 20.
        let zadd = |key: String| {
            let mut cmd = ::redis::Cmd::with_capacity(2 + 2 * part.len(), 64 + 60 * part.len());
            cmd.arg("ZADD").arg(key);
            cmd
        };
        let mut listed = zadd(format!("{base}:s:available"));
        let mut ordered = zadd(format!("{base}:ready"));
        let mut later = zadd(format!("{base}:s:scheduled"));
        let mut delayed = zadd(format!("{base}:delayed"));
        let (mut ready, mut waiting) = (false, false);
        for &i in part {
            let job = &jobs[i];
            let run_at = job.due_at(batch.now);
            let args = serde_json::to_string(&job.args)?;
            let mut hset = ::redis::Cmd::with_capacity(24, 256 + job.kind.len() + args.len());
            hset.arg("HSET")
                .arg(format!("{base}:job:{}", ids[i]))
                .arg("kind")
                .arg(&job.kind)
                .arg("args")
                .arg(args)
                .arg("priority")
                .arg(job.priority)
                .arg("state")
                .arg(batch.states[i].as_str())
                .arg("attempt")
                .arg(0)
                .arg("max_attempts")
                .arg(job.max_attempts)
                .arg("run_at")
                .arg(run_at.timestamp_micros())
                .arg("created_at")
                .arg(batch.now.timestamp_micros());
            // An empty key, tags or metadata is not stored (readers take none, [] and {}).
            if let Some(key) = &job.idempotency_key {
                hset.arg("idempotency_key").arg(key);
            }
            if !job.tags.is_empty() {
                hset.arg("tags").arg(serde_json::to_string(&job.tags)?);
            }
            match &job.metadata {
                serde_json::Value::Object(m) if m.is_empty() => {}
                other => {
                    hset.arg("metadata").arg(serde_json::to_string(other)?);
                }
            }
            pipe.add_command(hset);
            if batch.states[i] == JobState::Available {
                listed.arg(0).arg(&ids[i]);
                ready_score(&mut ordered, job.priority, run_at);
                ordered.arg(&ids[i]);
                ready = true;
            } else {
                later.arg(0).arg(&ids[i]);
                delayed.arg(run_at.timestamp_micros()).arg(&ids[i]);
                waiting = true;
            }
        }
        if ready {
            pipe.add_command(listed);
            pipe.add_command(ordered);
            pipe.cmd("PUBLISH").arg(self.keys.jobs_channel()).arg(queue);
        }
        if waiting {
            pipe.add_command(later);
            pipe.add_command(delayed);
        }
        pipe.cmd("EXEC");
        // A plain PERSIST: the key was claimed by this call a moment ago and a claim lasts
        // CLAIM_MS, so it is still ours unless this insert stalled for longer than that.
        for &i in part {
            if let Some(key) = &jobs[i].idempotency_key {
                pipe.cmd("PERSIST").arg(self.keys.idempotency(key)).ignore();
            }
        }
        Ok(pipe)
    }

    /// The writes before a part's transaction: the queue into the queue registry, generated
    /// ids into the id index (caller-chosen ones were reserved there already).
    pub(super) fn registry_writes(
        &self,
        batch: &Incoming<'_>,
        queue: &str,
        part: &[usize],
    ) -> Vec<::redis::Cmd> {
        let mut sadd = ::redis::cmd("SADD");
        sadd.arg(self.keys.queues()).arg(queue);
        let mut cmds = vec![sadd];
        let generated: Vec<usize> = part
            .iter()
            .copied()
            .filter(|&i| batch.jobs[i].id.is_none())
            .collect();
        if !generated.is_empty() {
            let mut hset = ::redis::cmd("HSET");
            hset.arg(self.keys.index());
            for &i in &generated {
                hset.arg(&batch.id_text[i]).arg(queue);
            }
            cmds.push(hset);
        }
        cmds
    }

    /// Runs a part's insert pipeline (see [`Self::insert_pipeline`]) and leaves the part
    /// either applied whole or, as far as the answers tell, not at all:
    ///
    /// - transaction refused (Redis out of memory refuses it whole): nothing of it applied,
    ///   so the part's ids leave the index and its key claims are freed (the `PERSIST`s
    ///   after `EXEC` ran regardless). A retry of the call inserts these jobs; no key is left
    ///   pointing at a job that does not exist.
    /// - transaction applied but a write before it refused (memory freed by someone else in
    ///   between): the refused writes are sent again, so the jobs are listed and found.
    /// - no answer (connection lost): the insert may have been applied, and its key
    ///   confirmations with it or not: every claim whose job exists is confirmed, so the key
    ///   outlives the claim's expiry. Unconfirmed claims of jobs that do not exist expire.
    pub(super) async fn run_insert(
        &self,
        pipe: &Pipeline,
        batch: &Incoming<'_>,
        queue: &str,
        inserting: &[usize],
        claimed: &[usize],
    ) -> Result<()> {
        let mut replies: Vec<::redis::Value> = match self.run(pipe).await {
            Ok(replies) => replies,
            Err(e) => {
                self.confirm_existing(batch, claimed).await;
                return Err(e);
            }
        };
        let exec = replies.pop().map(::redis::Value::extract_error);
        // Why a transaction was refused: the first command refused before or inside it.
        let cause = |replies: Vec<::redis::Value>, exec: ::redis::RedisError| {
            replies
                .into_iter()
                .find_map(|r| r.extract_error().err())
                .unwrap_or(exec)
        };
        match exec {
            Some(Ok(::redis::Value::Array(results))) => {
                if let Some(e) = results.into_iter().find_map(|r| r.extract_error().err()) {
                    // A command inside the transaction failed on its own (a key of the wrong
                    // type: data not written by this version). The others applied.
                    self.confirm_existing(batch, claimed).await;
                    return Err(Error::Unsupported(format!(
                        "Redis failed a write while enqueueing into queue `{queue}`: {e}"
                    )));
                }
            }
            Some(Err(e)) => {
                self.undo_insert(batch, inserting, claimed).await;
                return Err(cause(replies, e).into());
            }
            other => {
                self.confirm_existing(batch, claimed).await;
                return Err(Error::Unsupported(format!(
                    "Redis answered a transaction with {other:?}"
                )));
            }
        }
        // The transaction applied, so every command inside it was queued: a refused reply
        // is one of the writes before it.
        if replies
            .iter()
            .any(|r| matches!(r, ::redis::Value::ServerError(_)))
        {
            let mut repair = ::redis::pipe();
            for cmd in self.registry_writes(batch, queue, inserting) {
                repair.add_command(cmd).ignore();
            }
            if let Err(e) = self.run::<()>(&repair).await {
                tracing::error!(queue, error = %e, "jobs were inserted but could not be entered into the queue registry and id index; a retry of the enqueue repairs it");
                return Err(e);
            }
        }
        Ok(())
    }

    /// After a refused insert transaction: takes the part's ids out of the index and frees
    /// its key claims (only those this call still holds). Neither step is a write Redis
    /// refuses when out of memory.
    pub(super) async fn undo_insert(
        &self,
        batch: &Incoming<'_>,
        inserting: &[usize],
        claimed: &[usize],
    ) {
        let mut pipe = ::redis::pipe();
        for chunk in inserting.chunks(CHUNK) {
            let mut hdel = ::redis::cmd("HDEL");
            hdel.arg(self.keys.index());
            for &i in chunk {
                hdel.arg(&batch.id_text[i]);
            }
            pipe.add_command(hdel).ignore();
        }
        if let Err(e) = self.run::<()>(&pipe).await {
            tracing::warn!(error = %e, "could not take the ids of a refused enqueue out of the index; lookups of them find no job");
        }
        self.release_claims(batch, claimed).await;
    }

    /// Enters caller-chosen ids into the global index, refusing one that exists (in any
    /// queue). On refusal nothing stays reserved.
    pub(super) async fn reserve_ids(&self, batch: &Incoming<'_>, which: &[usize]) -> Result<()> {
        let (jobs, ids) = (batch.jobs, &batch.ids);
        let chosen: Vec<usize> = which
            .iter()
            .copied()
            .filter(|&i| jobs[i].id.is_some())
            .collect();
        if chosen.is_empty() {
            return Ok(());
        }
        let mut pipe = ::redis::pipe();
        // Every reply comes back, errors included, so a part refused half-way (Redis out of
        // memory) undoes exactly the reservations it made.
        pipe.ignore_errors();
        for &i in &chosen {
            pipe.cmd("HSETNX")
                .arg(self.keys.index())
                .arg(ids[i].to_string())
                .arg(&jobs[i].queue);
        }
        let set: Vec<::redis::Value> = self.run(&pipe).await?;
        let taken = set.iter().position(|s| matches!(s, ::redis::Value::Int(0)));
        let refused = set.iter().find_map(|s| s.clone().extract_error().err());
        if taken.is_none() && refused.is_none() {
            return Ok(());
        }
        let mut undo = ::redis::cmd("HDEL");
        undo.arg(self.keys.index());
        let mut any = false;
        for (&i, s) in chosen.iter().zip(&set) {
            if matches!(s, ::redis::Value::Int(1)) {
                undo.arg(ids[i].to_string());
                any = true;
            }
        }
        if any {
            let mut conn = self.conn.clone();
            undo.query_async::<()>(&mut conn).await?;
        }
        match (refused, taken) {
            (Some(e), _) => Err(e.into()),
            (None, Some(pos)) => Err(Error::invalid(
                "id",
                format!("job id {} already exists", ids[chosen[pos]]),
            )),
            (None, None) => Ok(()),
        }
    }
}

/// A bulk enqueue part's answers (job index, answer), or why it has none: its error, or
/// `None` when it was not started because another part failed.
pub(super) type PartResult = std::result::Result<Vec<(usize, Enqueued)>, Option<Error>>;

/// A batch being enqueued, with what every part of it needs computed once.
pub(super) struct Incoming<'a> {
    pub(super) jobs: &'a [NewJob],
    pub(super) now: DateTime<Utc>,
    pub(super) ids: Vec<JobId>,
    /// The ids as text, as they appear in keys and sets.
    pub(super) id_text: Vec<String>,
    pub(super) states: Vec<JobState>,
}

impl<'a> Incoming<'a> {
    pub(super) fn new(jobs: &'a [NewJob], now: DateTime<Utc>) -> Self {
        let ids: Vec<JobId> = jobs
            .iter()
            .map(|j| j.id.unwrap_or_else(JobId::new))
            .collect();
        let id_text = ids.iter().map(JobId::to_string).collect();
        let states = jobs
            .iter()
            .map(|j| {
                if j.due_at(now) > now {
                    JobState::Scheduled
                } else {
                    JobState::Available
                }
            })
            .collect();
        Incoming {
            jobs,
            now,
            ids,
            id_text,
            states,
        }
    }

    /// Job `i`'s idempotency key (empty when it has none).
    pub(super) fn key(&self, i: usize) -> &str {
        self.jobs[i].idempotency_key.as_deref().unwrap_or_default()
    }

    /// What job `i`'s key claim holds: `queue/id`.
    pub(super) fn holder(&self, i: usize) -> String {
        format!("{}/{}", self.jobs[i].queue, self.id_text[i])
    }
}
