//! Retry, cancel and discard: one job, or every job a filter selects. The store decides which
//! states each may start from and refuses the rest; these add the checks on the request and
//! the audit record.

use conveyor_worker::store::{CancelResult, JobFilter, Page};
use conveyor_worker::{Error as StoreError, Job, JobId, JobState, OperatorAction};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{Actor, Admin, Result};

/// Most ids one bulk filter may name.
pub const MAX_BULK_IDS: usize = 1000;

/// What a bulk action does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BulkAction {
    /// Retry every matching job that is not running.
    Retry,
    /// Cancel every matching waiting or running job.
    Cancel,
    /// Delete every matching finished job (completed, cancelled, dead).
    Discard,
}

impl BulkAction {
    /// `retry`, `cancel` or `discard`.
    pub fn name(self) -> &'static str {
        match self {
            BulkAction::Retry => "retry",
            BulkAction::Cancel => "cancel",
            BulkAction::Discard => "discard",
        }
    }

    /// The store action it applies to each job, and so the states it selects.
    fn operator_action(self) -> OperatorAction {
        match self {
            BulkAction::Retry => OperatorAction::Retry,
            BulkAction::Cancel => OperatorAction::Cancel,
            BulkAction::Discard => OperatorAction::Purge,
        }
    }

    /// The states the store's bulk statement for this action touches (from the one
    /// definition beside `JobState`), so a count (a dry run, `matched`) selects what the
    /// action would change.
    fn states(self) -> Vec<JobState> {
        self.operator_action().from_states().to_vec()
    }
}

/// What a bulk action selects and how.
#[derive(Clone, Debug, Default)]
pub struct BulkRequest {
    /// Which jobs; at least one field, or `all`.
    pub filter: JobFilter,
    /// Act on every job when the filter is empty.
    pub all: bool,
    /// Only count.
    pub dry_run: bool,
}

/// What a bulk action did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BulkOutcome {
    /// `retry`, `cancel` or `discard`.
    pub action: &'static str,
    /// Nothing was changed; `matched` is what would be.
    pub dry_run: bool,
    /// Jobs the filter selects that the action applies to.
    pub matched: u64,
    /// Jobs changed (0 on a dry run).
    pub affected: u64,
    /// A bulk cancel stops after `api.bulk_cancel_limit` jobs: true when matching jobs remain.
    pub more: bool,
}

fn is_empty(f: &JobFilter) -> bool {
    f.states.is_empty()
        && f.queue.is_none()
        && f.kind.is_none()
        && f.tag.is_none()
        && f.created_after.is_none()
        && f.created_before.is_none()
        && f.error_contains.is_none()
        && f.ids.is_empty()
}

impl Admin {
    /// Makes a job available now with a fresh attempt budget. Audited as `job.retry`.
    pub async fn retry(&self, actor: &Actor, id: JobId) -> Result<Job> {
        let job = self.store.retry(id).await?;
        self.audit(actor, "job.retry", json!({ "ids": [id] }), 1)
            .await?;
        Ok(job)
    }

    /// Cancels a waiting job, or asks the worker running it to stop. Audited as `job.cancel`.
    pub async fn cancel(&self, actor: &Actor, id: JobId) -> Result<CancelResult> {
        let result = self.store.cancel(id).await?;
        self.audit(
            actor,
            "job.cancel",
            json!({ "ids": [id], "result": cancel_name(result) }),
            1,
        )
        .await?;
        Ok(result)
    }

    /// Deletes a job that is not running. Audited as `job.discard`.
    pub async fn discard(&self, actor: &Actor, id: JobId) -> Result<()> {
        self.store.discard(id).await?;
        self.audit(actor, "job.discard", json!({ "ids": [id] }), 1)
            .await
    }

    /// Retries, cancels or discards every job the filter selects (`dry_run`: counts only).
    /// Audited as `jobs.<action>` with the filter as applied.
    pub async fn bulk(
        &self,
        actor: &Actor,
        action: BulkAction,
        request: BulkRequest,
    ) -> Result<BulkOutcome> {
        let BulkRequest {
            mut filter,
            all,
            dry_run,
        } = request;
        if is_empty(&filter) && !all {
            return Err(StoreError::invalid(
                "filter",
                "give at least one filter field, or `all` to select every job",
            )
            .into());
        }
        if filter.ids.len() > MAX_BULK_IDS {
            return Err(StoreError::invalid(
                "filter.ids",
                format!(
                    "at most {MAX_BULK_IDS} ids per call, got {}; split them, or select by a filter",
                    filter.ids.len()
                ),
            )
            .into());
        }
        let applies = action.states();
        filter.states = if filter.states.is_empty() {
            applies
        } else {
            filter
                .states
                .into_iter()
                .filter(|s| applies.contains(s))
                .collect()
        };
        let mut answer = BulkOutcome {
            action: action.name(),
            dry_run,
            matched: 0,
            affected: 0,
            more: false,
        };
        // An action that applies to none of the requested states selects nothing (an empty
        // state list would mean "all states" to the store).
        if filter.states.is_empty() {
            return Ok(answer);
        }
        answer.matched = self.store.count(&filter).await?;
        if dry_run {
            return Ok(answer);
        }
        answer.affected = match action {
            BulkAction::Retry => self.store.retry_matching(&filter).await?,
            BulkAction::Discard => self.store.purge(&filter).await?,
            BulkAction::Cancel => {
                let (n, more) = self.cancel_matching(&filter).await?;
                answer.more = more;
                n
            }
        };
        self.audit(
            actor,
            &format!("jobs.{}", action.name()),
            json!({ "filter": filter }),
            answer.affected,
        )
        .await?;
        Ok(answer)
    }

    /// Cancels matching jobs page by page, up to `bulk_cancel_limit`. Returns how many and
    /// whether matching jobs remain.
    async fn cancel_matching(&self, filter: &JobFilter) -> Result<(u64, bool)> {
        let cap = u64::from(self.limits.bulk_cancel_limit);
        let mut done = 0u64;
        let mut before = None;
        loop {
            let page = self.store.list(filter, Page { before, limit: 500 }).await?;
            let full = page.len() == 500;
            before = page.last().map(|j| j.id);
            for job in page {
                if done >= cap {
                    return Ok((done, true));
                }
                match self.store.cancel(job.id).await {
                    Ok(_) => done += 1,
                    // Finished or deleted meanwhile: nothing to cancel.
                    Err(StoreError::WrongState { .. } | StoreError::NotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if !full {
                return Ok((done, false));
            }
        }
    }
}

/// `cancelled` or `requested`.
pub fn cancel_name(result: CancelResult) -> &'static str {
    match result {
        CancelResult::Cancelled => "cancelled",
        CancelResult::Requested => "requested",
    }
}

/// Object keys whose values are shown as `"[redacted]"` by [`redacted_args`]: any key that
/// contains one of these, compared without case.
pub const SECRET_KEY_PARTS: [&str; 9] = [
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "authorization",
    "cookie",
    "private_key",
];

/// A job's args as an operator may see them on a screen: the value of every object key that
/// names a secret ([`SECRET_KEY_PARTS`]), at any depth, replaced by `"[redacted]"`.
pub fn redacted_args(args: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match args {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let lower = k.to_ascii_lowercase();
                    let v = if SECRET_KEY_PARTS.iter().any(|p| lower.contains(p)) {
                        Value::String("[redacted]".into())
                    } else {
                        redacted_args(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redacted_args).collect()),
        other => other.clone(),
    }
}

/// A job's args as a caller with `scope` receives them from the API: whole for `admin` keys,
/// [`redacted_args`] for every other key (a `read` key on a dashboard or a monitor, an
/// `operate` key retrying jobs) — the same rule the dashboard applies on screen.
pub fn args_as_seen_by(scope: crate::key::Scope, args: serde_json::Value) -> serde_json::Value {
    if scope == crate::key::Scope::Admin {
        args
    } else {
        redacted_args(&args)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn only_admin_keys_see_secrets_in_args() {
        use crate::key::Scope;
        let args = json!({"to": "a@example.com", "api_key": "k"});
        assert_eq!(super::args_as_seen_by(Scope::Admin, args.clone()), args);
        for scope in [Scope::Read, Scope::Operate] {
            assert_eq!(
                super::args_as_seen_by(scope, args.clone()),
                json!({"to": "a@example.com", "api_key": "[redacted]"})
            );
        }
    }

    #[test]
    fn secrets_are_redacted_at_any_depth_and_the_rest_kept() {
        let args = json!({
            "to": "a@example.com",
            "Password": "hunter2",
            "smtp": { "auth_token": "t0k", "host": "mx" },
            "list": [{ "apiKey": "k" }, 3],
        });
        assert_eq!(
            super::redacted_args(&args),
            json!({
                "to": "a@example.com",
                "Password": "[redacted]",
                "smtp": { "auth_token": "[redacted]", "host": "mx" },
                "list": [{ "apiKey": "[redacted]" }, 3],
            })
        );
    }
}
