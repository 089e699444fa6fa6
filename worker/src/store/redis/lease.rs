//! Running jobs: fetch claims a batch under a worker's lease, outcomes finish them (or the
//! rescuer's, guarded by the lease's expiry), heartbeats renew the leases. [`RunningQueues`]
//! remembers the queue of each job claimed here so its outcome needs no lookup.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::codec::*;
use super::script::*;
use super::{CHUNK, RedisStore};
use crate::error::Result;
use crate::job::{Job, JobId, JobState};
use crate::store::{FetchRequest, Finish, JobChange};

/// Claims of at most this many jobs come back with the jobs' hashes in the fetch script's
/// answer (one round trip, for latency); larger ones read the hashes in a second round trip,
/// which costs the server far less per job.
pub(super) const FETCH_INLINE: usize = 16;

/// Most claimed jobs whose queue [`RunningQueues`] remembers.
pub(super) const RUNNING_CACHE: usize = 100_000;

/// The queue of each job this store claimed and has not yet written an outcome for, so a
/// completion batch goes straight to its queue's script instead of first asking `P:index`.
/// Past [`RUNNING_CACHE`] entries further claims are not remembered, and an outcome for a job
/// not found here (a rescue, a job adopted after a lost fetch answer) looks its queue up.
#[derive(Default)]
pub(super) struct RunningQueues(std::sync::Mutex<HashMap<JobId, Arc<str>>>);

impl RunningQueues {
    pub(super) fn map(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Arc<str>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn remember(&self, queue: &str, ids: impl Iterator<Item = JobId>) {
        let queue: Arc<str> = Arc::from(queue);
        let mut map = self.map();
        for id in ids {
            if map.len() >= RUNNING_CACHE {
                break;
            }
            map.insert(id, queue.clone());
        }
    }

    pub(super) fn lookup(&self, ids: &[JobId]) -> Vec<Option<Arc<str>>> {
        let map = self.map();
        ids.iter().map(|id| map.get(id).cloned()).collect()
    }

    pub(super) fn forget(&self, ids: &[JobId]) {
        let mut map = self.map();
        for id in ids {
            map.remove(id);
        }
    }
}

impl RedisStore {
    /// The queue of each job (in order; `None` for a job that no longer exists): from
    /// [`RunningQueues`] for the jobs this store claimed, from the id index for the rest,
    /// which one round trip answers.
    async fn queues_of_leased(&self, ids: &[JobId]) -> Result<Vec<Option<String>>> {
        let mut queues: Vec<Option<String>> = self
            .running
            .lookup(ids)
            .into_iter()
            .map(|q| q.map(|q| q.to_string()))
            .collect();
        let unknown: Vec<JobId> = ids
            .iter()
            .zip(&queues)
            .filter(|(_, q)| q.is_none())
            .map(|(id, _)| *id)
            .collect();
        if !unknown.is_empty() {
            let mut found = self.queues_of(&unknown).await?.into_iter();
            for q in queues.iter_mut().filter(|q| q.is_none()) {
                *q = found.next().flatten();
            }
        }
        Ok(queues)
    }

    /// Applies outcomes queue by queue; returns the ids applied. With `guard`, an outcome
    /// applies only if the job's lease expired before it (the rescuer's condition).
    pub(super) async fn apply(
        &self,
        outcomes: &[Finish],
        guard: Option<DateTime<Utc>>,
    ) -> Result<Vec<JobId>> {
        let ids: Vec<JobId> = outcomes.iter().map(|f| f.id).collect();
        let queues = self.queues_of_leased(&ids).await?;
        let mut by_queue: BTreeMap<String, Vec<&Finish>> = BTreeMap::new();
        for (f, q) in outcomes.iter().zip(queues) {
            if let Some(q) = q {
                by_queue.entry(q).or_default().push(f);
            }
        }
        let mut invocations = Vec::new();
        for (queue, fs) in &by_queue {
            for chunk in fs.chunks(CHUNK) {
                let mut inv = FINISH.prepare_invoke();
                inv.key(format!("{}:ready", self.keys.queue(queue)))
                    .arg(self.keys.queue(queue))
                    .arg(self.keys.jobs_channel())
                    .arg(queue)
                    .arg(guard.map(micros).unwrap_or_default());
                for f in chunk {
                    let terminal = f.state.is_terminal();
                    inv.arg(f.id.to_string())
                        .arg(f.attempt)
                        .arg(f.state.as_str())
                        .arg(match (terminal, f.run_at) {
                            (false, Some(at)) => micros(at),
                            _ => String::new(),
                        })
                        .arg(if terminal {
                            micros(f.record.finished_at)
                        } else {
                            String::new()
                        })
                        .arg(f.attempt_delta)
                        .arg(serde_json::to_string(&f.record)?)
                        .arg(match &f.result {
                            Some(r) => serde_json::to_string(r)?,
                            None => String::new(),
                        });
                }
                invocations.push((queue.clone(), inv));
            }
        }
        if invocations.is_empty() {
            self.running.forget(&ids);
            return Ok(Vec::new());
        }
        let mut pipe = ::redis::pipe();
        for (_, inv) in &invocations {
            pipe.invoke_script(inv);
        }
        let answers: Vec<Vec<String>> = self.run(&pipe).await?;
        // Every outcome got its answer, applied or stale: none of these jobs runs here now.
        self.running.forget(&ids);
        let next: HashMap<JobId, JobState> = outcomes.iter().map(|f| (f.id, f.state)).collect();
        let mut applied = Vec::new();
        let mut woken = Vec::new();
        let mut changes = Vec::new();
        for ((queue, _), ids) in invocations.iter().zip(answers) {
            for id in ids {
                let id: JobId = id.parse()?;
                let state = next.get(&id).copied();
                if state == Some(JobState::Available) {
                    woken.push(queue.clone());
                }
                if let Some(state) = state {
                    changes.push(JobChange { id, state });
                }
                applied.push(id);
            }
        }
        self.wake(woken);
        self.publish_changes(changes);
        Ok(applied)
    }

    pub(super) async fn claim(&self, request: FetchRequest<'_>) -> Result<Vec<Job>> {
        let base = self.keys.queue(request.queue);
        let mut inv = FETCH.prepare_invoke();
        inv.key(format!("{base}:ready"))
            .arg(&base)
            .arg(lease_micros(request.lease))
            .arg(request.limit)
            .arg(request.worker)
            .arg(CHUNK)
            .arg(FETCH_INLINE);
        let mut rows: Vec<(String, Vec<String>, Option<String>)> = self.eval(&inv).await?;
        if rows.iter().any(|(_, fields, _)| fields.is_empty()) {
            // A large claim: read the hashes with plain commands. These jobs are running
            // under this worker's lease, so nothing deletes them meanwhile; if this read
            // fails, the runtime adopts the claimed jobs as after any fetch whose answer was
            // lost.
            let mut pipe = ::redis::pipe();
            for (id, _, _) in &rows {
                read_job(&mut pipe, &base, id);
            }
            let hashes: Vec<(Vec<String>, Option<String>)> = self.run(&pipe).await?;
            for ((_, fields, history), (hash, h)) in rows.iter_mut().zip(hashes) {
                *fields = hash;
                *history = h;
            }
        }
        let mut jobs = rows
            .into_iter()
            .map(|(id, fields, history)| {
                job_from_fields(request.queue, id.parse()?, fields, history)
            })
            .collect::<Result<Vec<_>>>()?;
        jobs.sort_by_key(|a| (a.priority, a.run_at, a.id));
        self.running
            .remember(request.queue, jobs.iter().map(|j| j.id));
        self.publish_changes(
            jobs.iter()
                .map(|j| JobChange {
                    id: j.id,
                    state: JobState::Running,
                })
                .collect(),
        );
        Ok(jobs)
    }

    /// Records a running attempt's progress (the `progress.lua` script on the job's queue).
    pub(super) async fn record_progress(
        &self,
        id: JobId,
        progress: &crate::job::Progress,
    ) -> Result<bool> {
        let queue = match self.running.lookup(&[id]).pop().flatten() {
            Some(q) => q.to_string(),
            None => match self.queues_of(&[id]).await?.pop().flatten() {
                Some(q) => q,
                None => return Ok(false),
            },
        };
        let base = self.keys.queue(&queue);
        let mut inv = PROGRESS.prepare_invoke();
        inv.key(format!("{base}:ready"))
            .arg(&base)
            .arg(id.to_string())
            .arg(progress.attempt)
            .arg(serde_json::to_string(progress)?);
        let applied: i64 = self.eval(&inv).await?;
        Ok(applied == 1)
    }

    /// Renews the leases of the `held` jobs that run under `worker`: one heartbeat script per
    /// queue they are in, all in one pipeline. A job's queue comes from [`RunningQueues`]
    /// when this store claimed it, else from the id index.
    pub(super) async fn renew(
        &self,
        worker: &str,
        held: &[JobId],
        lease: Duration,
    ) -> Result<Vec<JobId>> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let queues = self.queues_of_leased(held).await?;
        let mut by_queue: BTreeMap<String, Vec<JobId>> = BTreeMap::new();
        for (id, q) in held.iter().zip(queues) {
            if let Some(q) = q {
                by_queue.entry(q).or_default().push(*id);
            }
        }
        if by_queue.is_empty() {
            return Ok(Vec::new());
        }
        let lease = lease_micros(lease);
        let mut pipe = ::redis::pipe();
        for (queue, ids) in &by_queue {
            let base = self.keys.queue(queue);
            let mut inv = HEARTBEAT.prepare_invoke();
            inv.key(format!("{base}:leases"))
                .arg(&base)
                .arg(worker)
                .arg(&lease);
            for id in ids {
                inv.arg(id.to_string());
            }
            pipe.invoke_script(&inv);
        }
        let cancel: Vec<Vec<String>> = self.run(&pipe).await?;
        cancel.into_iter().flatten().map(|id| id.parse()).collect()
    }
}
