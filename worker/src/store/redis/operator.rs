//! Operator actions: retry, cancel, discard one job, and retry or purge every job a filter
//! matches, a page at a time. Each is a script that checks the job's state first and
//! answers why it refused.

use std::collections::BTreeMap;

use super::script::*;
use super::{CHUNK, RedisStore};
use crate::error::{Error, Result};
use crate::job::{Job, JobId, JobState, OperatorAction};
use crate::store::{CancelResult, JobFilter, StoreEvent};

impl RedisStore {
    /// Runs the delete script over `ids` of one queue; returns per id the status and key.
    pub(super) async fn delete_in(
        &self,
        queue: &str,
        ids: &[JobId],
        action: OperatorAction,
    ) -> Result<Vec<(String, String)>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK) {
            let mut inv = DELETE.prepare_invoke();
            inv.key(format!("{}:ready", self.keys.queue(queue)))
                .arg(self.keys.queue(queue))
                .arg(action.as_str());
            for id in chunk {
                inv.arg(id.to_string());
            }
            let flat: Vec<String> = self.eval(&inv).await?;
            let mut deleted = Vec::new();
            for (id, pair) in chunk.iter().zip(flat.chunks(2)) {
                if pair[0] == "ok" {
                    deleted.push((queue.to_string(), *id, pair[1].clone()));
                }
                out.push((pair[0].clone(), pair[1].clone()));
            }
            self.forget(&deleted).await?;
        }
        Ok(out)
    }

    /// Runs the retry script over `ids` of one queue; returns one status per id.
    pub(super) async fn retry_in(&self, queue: &str, ids: &[JobId]) -> Result<Vec<String>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK) {
            let mut inv = RETRY.prepare_invoke();
            inv.key(format!("{}:ready", self.keys.queue(queue)))
                .arg(self.keys.queue(queue))
                .arg(self.keys.jobs_channel())
                .arg(queue);
            for id in chunk {
                inv.arg(id.to_string());
            }
            let answers: Vec<String> = self.eval(&inv).await?;
            if answers.iter().any(|a| a == "ok") {
                self.wake([queue.to_string()]);
            }
            out.extend(answers);
        }
        Ok(out)
    }

    /// Applies `action` to every job matching `filter` in `allowed` states, a page at a time
    /// and one script call per queue within a page; returns how many it applied to. Each page
    /// is acted on as it is read, and the id cursor never meets a job twice.
    pub(super) async fn for_each_page(
        &self,
        filter: &JobFilter,
        allowed: &[JobState],
        action: Bulk,
    ) -> Result<u64> {
        let mut n = 0u64;
        let mut cursor = None;
        loop {
            let jobs = self.page(filter, allowed, cursor, CHUNK).await?;
            let full = jobs.len() == CHUNK;
            cursor = jobs.last().map(|j| j.id);
            let mut by_queue: BTreeMap<String, Vec<JobId>> = BTreeMap::new();
            for j in jobs {
                by_queue.entry(j.queue).or_default().push(j.id);
            }
            for (queue, ids) in by_queue {
                n += match action {
                    Bulk::Retry => {
                        let answers = self.retry_in(&queue, &ids).await?;
                        answers.iter().filter(|a| *a == "ok").count()
                    }
                    Bulk::Purge => {
                        let answers = self.delete_in(&queue, &ids, OperatorAction::Purge).await?;
                        answers.iter().filter(|(s, _)| s == "ok").count()
                    }
                } as u64;
            }
            if !full {
                return Ok(n);
            }
        }
    }

    /// Why an operation on `id` changed nothing: it is missing, or in the wrong state.
    pub(super) fn refusal(id: JobId, status: &str, action: OperatorAction) -> Error {
        match status.parse::<JobState>() {
            Ok(state) => Error::WrongState { id, state, action },
            Err(_) => Error::NotFound(id),
        }
    }

    pub(super) async fn retry_one(&self, id: JobId) -> Result<Job> {
        let Some(Some(queue)) = self.queues_of(&[id]).await?.pop() else {
            return Err(Error::NotFound(id));
        };
        let status = self
            .retry_in(&queue, &[id])
            .await?
            .pop()
            .unwrap_or_default();
        if status != "ok" {
            return Err(Self::refusal(id, &status, OperatorAction::Retry));
        }
        self.load_jobs(&[(queue, id)])
            .await?
            .pop()
            .ok_or(Error::NotFound(id))
    }

    pub(super) async fn retry_all(&self, filter: &JobFilter) -> Result<u64> {
        self.for_each_page(filter, OperatorAction::Retry.from_states(), Bulk::Retry)
            .await
    }

    pub(super) async fn cancel_one(&self, id: JobId) -> Result<CancelResult> {
        let Some(Some(queue)) = self.queues_of(&[id]).await?.pop() else {
            return Err(Error::NotFound(id));
        };
        let base = self.keys.queue(&queue);
        let mut inv = CANCEL.prepare_invoke();
        inv.key(format!("{base}:ready"))
            .arg(&base)
            .arg(self.keys.cancel_channel())
            .arg(id.to_string());
        let answer: Vec<String> = self.eval(&inv).await?;
        match answer.first().map(String::as_str) {
            Some("cancelled") => Ok(CancelResult::Cancelled),
            Some("requested") => {
                let _ = self.events.send(StoreEvent::CancelRequested { id });
                Ok(CancelResult::Requested)
            }
            Some("wrong") => Err(Self::refusal(
                id,
                answer.get(1).map_or("", String::as_str),
                OperatorAction::Cancel,
            )),
            _ => Err(Error::NotFound(id)),
        }
    }

    pub(super) async fn discard_one(&self, id: JobId) -> Result<()> {
        let Some(Some(queue)) = self.queues_of(&[id]).await?.pop() else {
            return Err(Error::NotFound(id));
        };
        let (status, _) = self
            .delete_in(&queue, &[id], OperatorAction::Discard)
            .await?
            .pop()
            .unwrap_or_default();
        if status == "ok" {
            Ok(())
        } else {
            Err(Self::refusal(id, &status, OperatorAction::Discard))
        }
    }

    pub(super) async fn purge_all(&self, filter: &JobFilter) -> Result<u64> {
        self.for_each_page(filter, OperatorAction::Purge.from_states(), Bulk::Purge)
            .await
    }
}

/// What [`RedisStore::for_each_page`] does to each page.
#[derive(Clone, Copy)]
pub(super) enum Bulk {
    /// Admin retry (now, on the server's clock).
    Retry,
    /// Delete finished jobs.
    Purge,
}
