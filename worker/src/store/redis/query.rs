//! Reading jobs by filter: the (queue, state) sets a filter reads, pages merged from them
//! newest first, the conditions on a job's own fields, counts and per-queue statistics.

use std::collections::{BTreeMap, BTreeSet};

use chrono::DateTime;

use super::script::*;
use super::{CHUNK, RedisStore};
use crate::error::Result;
use crate::job::{Job, JobId, JobState};
use crate::store::{JobFilter, QueueStats};

impl RedisStore {
    /// Per (queue, state) source, the next ids strictly below `before`, newest first: at most
    /// `n` of them overall, with their queue.
    pub(super) async fn candidates(
        &self,
        sources: &[(String, JobState)],
        before: Option<JobId>,
        n: usize,
    ) -> Result<Vec<(JobId, String)>> {
        if sources.is_empty() {
            return Ok(Vec::new());
        }
        let max = match before {
            Some(id) => format!("({id}"),
            None => "+".to_string(),
        };
        let mut pipe = ::redis::pipe();
        for (queue, state) in sources {
            if *state == JobState::Running {
                // Running jobs are the lease set, ordered by deadline: read it whole (it holds
                // at most the workers' combined concurrency) and cut the page here.
                pipe.cmd("ZRANGE")
                    .arg(format!("{}:leases", self.keys.queue(queue)))
                    .arg(0)
                    .arg(-1);
            } else {
                pipe.cmd("ZRANGE")
                    .arg(format!("{}:s:{}", self.keys.queue(queue), state.as_str()))
                    .arg(&max)
                    .arg("-")
                    .arg("BYLEX")
                    .arg("REV")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(n);
            }
        }
        let lists: Vec<Vec<String>> = self.run(&pipe).await?;
        let mut all = Vec::new();
        for ((queue, _), ids) in sources.iter().zip(lists) {
            for id in ids {
                let id = id.parse::<JobId>()?;
                if before.is_none_or(|b| id < b) {
                    all.push((id, queue.clone()));
                }
            }
        }
        all.sort_by_key(|c| std::cmp::Reverse(c.0));
        all.dedup_by(|a, b| a.0 == b.0);
        all.truncate(n);
        Ok(all)
    }

    /// The (queue, state) sets a filter reads, limited to `allowed` states.
    pub(super) async fn sources(
        &self,
        filter: &JobFilter,
        allowed: &[JobState],
    ) -> Result<Vec<(String, JobState)>> {
        let queues = match &filter.queue {
            Some(q) => vec![q.clone()],
            None => self.queues().await?,
        };
        let states: Vec<JobState> = allowed
            .iter()
            .copied()
            .filter(|s| filter.states.is_empty() || filter.states.contains(s))
            .collect();
        Ok(queues
            .iter()
            .flat_map(|q| states.iter().map(move |s| (q.clone(), *s)))
            .collect())
    }

    /// One page of jobs matching `filter` in `allowed` states, newest first, strictly older
    /// than `before`.
    pub(super) async fn page(
        &self,
        filter: &JobFilter,
        allowed: &[JobState],
        before: Option<JobId>,
        limit: usize,
    ) -> Result<Vec<Job>> {
        let keep = |j: &Job| allowed.contains(&j.state) && matches(j, filter);
        if !filter.ids.is_empty() {
            let mut ids: Vec<JobId> = filter
                .ids
                .iter()
                .copied()
                .filter(|id| before.is_none_or(|b| *id < b))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            ids.reverse();
            let mut out = Vec::new();
            for chunk in ids.chunks(CHUNK) {
                let queues = self.queues_of(chunk).await?;
                let refs: Vec<(String, JobId)> = chunk
                    .iter()
                    .zip(queues)
                    .filter_map(|(id, q)| q.map(|q| (q, *id)))
                    .collect();
                out.extend(self.load_jobs(&refs).await?.into_iter().filter(keep));
                if out.len() >= limit {
                    break;
                }
            }
            out.truncate(limit);
            return Ok(out);
        }
        let sources = self.sources(filter, allowed).await?;
        // Without filters on the job's fields every candidate matches: read exactly a page.
        let refine = filter.kind.is_some()
            || filter.tag.is_some()
            || filter.created_after.is_some()
            || filter.created_before.is_some()
            || filter.error_contains.is_some();
        let batch = if refine { limit.max(200) } else { limit };
        let mut cursor = before;
        let mut out = Vec::new();
        loop {
            let refs = self.candidates(&sources, cursor, batch).await?;
            let Some(last) = refs.last() else { break };
            cursor = Some(last.0);
            let exhausted = refs.len() < batch;
            let refs: Vec<(String, JobId)> = refs.into_iter().map(|(id, q)| (q, id)).collect();
            for job in self.load_jobs(&refs).await? {
                if keep(&job) {
                    out.push(job);
                    if out.len() == limit {
                        return Ok(out);
                    }
                }
            }
            if exhausted {
                break;
            }
        }
        Ok(out)
    }

    pub(super) async fn count_matching(&self, filter: &JobFilter) -> Result<u64> {
        let by_sets_only = filter.ids.is_empty()
            && filter.kind.is_none()
            && filter.tag.is_none()
            && filter.created_after.is_none()
            && filter.created_before.is_none()
            && filter.error_contains.is_none();
        if by_sets_only {
            let sources = self.sources(filter, &JobState::ALL).await?;
            if sources.is_empty() {
                return Ok(0);
            }
            let mut pipe = ::redis::pipe();
            for (queue, state) in &sources {
                pipe.cmd("ZCARD").arg(self.keys.state_set(queue, *state));
            }
            let counts: Vec<u64> = self.run(&pipe).await?;
            return Ok(counts.into_iter().sum());
        }
        let mut n = 0u64;
        let mut cursor = None;
        loop {
            let jobs = self.page(filter, &JobState::ALL, cursor, CHUNK).await?;
            n += jobs.len() as u64;
            match jobs.last() {
                Some(last) if jobs.len() == CHUNK => cursor = Some(last.id),
                _ => return Ok(n),
            }
        }
    }

    pub(super) async fn stats(&self) -> Result<Vec<QueueStats>> {
        let queues = self.queues().await?;
        if queues.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = ::redis::pipe();
        for queue in &queues {
            let base = self.keys.queue(queue);
            let mut inv = STATS.prepare_invoke();
            inv.key(format!("{base}:ready")).arg(&base);
            for state in JobState::ALL {
                inv.arg(state.as_str());
            }
            pipe.invoke_script(&inv);
        }
        let rows: Vec<Vec<String>> = self.run(&pipe).await?;
        let mut stats = Vec::new();
        for (queue, row) in queues.into_iter().zip(rows) {
            let mut counts = BTreeMap::new();
            for (state, n) in JobState::ALL.iter().zip(&row) {
                let n: i64 = n.parse().unwrap_or(0);
                if n > 0 {
                    counts.insert(*state, n);
                }
            }
            if counts.is_empty() {
                continue;
            }
            let time = |i: usize| {
                row.get(i)
                    .and_then(|v| v.parse::<i64>().ok())
                    .and_then(DateTime::from_timestamp_micros)
            };
            // Ages are measured on the server's clock, which the script read.
            let (oldest, now) = (time(JobState::ALL.len()), time(JobState::ALL.len() + 1));
            stats.push(QueueStats {
                queue,
                counts,
                oldest_available_age: oldest
                    .zip(now)
                    .and_then(|(at, now)| (now - at).to_std().ok()),
            });
        }
        Ok(stats)
    }
}

/// The filter's conditions on a job's own fields (states and queue are chosen by the sets
/// read, ids by lookup).
pub(super) fn matches(job: &Job, filter: &JobFilter) -> bool {
    if !filter.states.is_empty() && !filter.states.contains(&job.state) {
        return false;
    }
    if filter.queue.as_ref().is_some_and(|q| *q != job.queue) {
        return false;
    }
    if filter.kind.as_ref().is_some_and(|k| *k != job.kind) {
        return false;
    }
    if filter.tag.as_ref().is_some_and(|t| !job.tags.contains(t)) {
        return false;
    }
    if filter.created_after.is_some_and(|t| job.created_at < t) {
        return false;
    }
    if filter.created_before.is_some_and(|t| job.created_at >= t) {
        return false;
    }
    if !filter.ids.is_empty() && !filter.ids.contains(&job.id) {
        return false;
    }
    if let Some(text) = &filter.error_contains {
        let needle = text.to_lowercase();
        let hit = job.attempts.iter().any(|a| {
            a.error
                .iter()
                .chain(a.causes.iter())
                .any(|m| m.to_lowercase().contains(&needle))
        });
        if !hit {
            return false;
        }
    }
    true
}
