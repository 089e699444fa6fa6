//! The admin commands: enqueue, jobs, dead, queues, migrate. Each opens the store the config
//! names, does one thing, and prints a table (or JSON with `--json`).

use std::sync::Arc;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use conveyor_admin::enqueue::JobRequest;
use conveyor_admin::job::{BulkAction, BulkRequest};
use conveyor_admin::{Actor, Admin};
use conveyor_worker::store::{JobFilter, Page};
use conveyor_worker::{JobId, JobState, Store};
use serde_json::json;

use crate::cli::{
    AuditCommand, DeadCommand, EnqueueArgs, FilterArgs, JobsCommand, KeysCommand, PageArgs,
    QueuesAction, QueuesArgs,
};
use crate::output;

/// Parses a JSON flag (inline, `@file` or `@-`), saying which flag and where the JSON breaks.
fn parse_json(flag: &str, text: &str) -> anyhow::Result<serde_json::Value> {
    crate::input::json_flag(flag, text)
}

/// An instant: RFC 3339, or an age like `2h` meaning that long ago.
fn parse_time(flag: &str, text: &str) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    match humantime::parse_duration(text) {
        Ok(age) => Ok(conveyor_worker::store::before(Utc::now(), age)),
        Err(_) => Err(crate::input::usage(format!(
            "{flag} `{text}` is neither an RFC 3339 time (2026-11-23T09:00:00Z) nor an age (30m, 2h, 7d)"
        ))),
    }
}

fn parse_id(text: &str) -> anyhow::Result<JobId> {
    Ok(text.parse::<JobId>()?)
}

fn build_filter(states: Vec<JobState>, f: &FilterArgs) -> anyhow::Result<JobFilter> {
    Ok(JobFilter {
        states,
        queue: f.queue.clone(),
        kind: f.kind.clone(),
        tag: f.tag.clone(),
        created_after: f
            .since
            .as_deref()
            .map(|s| parse_time("--since", s))
            .transpose()?,
        created_before: f
            .until
            .as_deref()
            .map(|s| parse_time("--until", s))
            .transpose()?,
        error_contains: f.error.clone(),
        ids: Vec::new(),
    })
}

fn has_filter(f: &FilterArgs) -> bool {
    f.queue.is_some()
        || f.kind.is_some()
        || f.tag.is_some()
        || f.since.is_some()
        || f.until.is_some()
        || f.error.is_some()
}

fn build_page(p: &PageArgs) -> anyhow::Result<Page> {
    Ok(Page {
        before: p.before.as_deref().map(parse_id).transpose()?,
        limit: p.limit,
    })
}

/// `conveyor enqueue`
pub async fn enqueue(admin: &Admin, a: EnqueueArgs) -> anyhow::Result<()> {
    let mut request = JobRequest {
        args: Some(parse_json("--args", &a.args)?),
        kind: a.kind,
        queue: Some(a.queue),
        priority: a.priority,
        max_attempts: Some(a.max_attempts),
        idempotency_key: a.idempotency_key,
        tags: a.tags,
        ..JobRequest::default()
    };
    if let Some(meta) = &a.metadata {
        request.metadata = Some(parse_json("--metadata", meta)?);
    }
    if let Some(at) = &a.run_at {
        let at = DateTime::parse_from_rfc3339(at).map_err(|e| {
            crate::input::usage(format!(
                "--run-at `{at}` is not an RFC 3339 time ({e}); write e.g. 2026-12-01T09:00:00Z"
            ))
        })?;
        request.run_at = Some(at.with_timezone(&Utc));
    }
    if let Some(delay) = &a.delay {
        // Counted from the store's clock at insert, not this machine's.
        request.delay = Some(humantime::parse_duration(delay).map_err(|e| {
            crate::input::usage(format!(
                "--delay `{delay}` is not a duration ({e}); write e.g. 30s, 5m or 2h"
            ))
        })?);
    }
    // The same checks as the API's, in the admin layer.
    let outcome = admin.enqueue(&Actor::cli(), request).await?;
    for w in &outcome.warnings {
        errln!("warning: {w}");
    }
    let enqueued = outcome.enqueued;
    if a.json {
        output::json(&enqueued)?;
    } else if enqueued.duplicate {
        outln!(
            "{} (duplicate: the idempotency key is already held by this job, which is {})",
            enqueued.id,
            enqueued.state
        );
    } else {
        outln!("{} enqueued ({})", enqueued.id, enqueued.state);
    }
    Ok(())
}

/// `conveyor jobs …`
pub async fn jobs(admin: &Admin, cmd: JobsCommand) -> anyhow::Result<()> {
    let store = admin.store();
    let actor = Actor::cli();
    match cmd {
        JobsCommand::List {
            state,
            filter,
            page,
            out,
        } => {
            let states = state
                .iter()
                .map(|s| s.trim().parse::<JobState>())
                .collect::<Result<Vec<_>, _>>()?;
            let filter = build_filter(states, &filter)?;
            let page = build_page(&page)?;
            let jobs = store.list(&filter, page).await?;
            if out.json {
                output::json(&jobs)
            } else {
                output::jobs_table(&jobs, page.limit);
                Ok(())
            }
        }
        JobsCommand::Show { id, out } => {
            let id = parse_id(&id)?;
            let job = store.get(id).await?.with_context(|| {
                format!("job {id} not found (it never existed, or was pruned after its retention)")
            })?;
            if out.json {
                output::json(&job)
            } else {
                output::job_detail(&job);
                Ok(())
            }
        }
        JobsCommand::Retry { ids, out } => {
            for_each(ids, out.json, "retried", |id| {
                let actor = &actor;
                async move {
                    let job = admin.retry(actor, id).await?;
                    Ok(json!({"state": job.state}))
                }
            })
            .await
        }
        JobsCommand::Cancel { ids, out } => {
            for_each(ids, out.json, "cancel", |id| {
                let actor = &actor;
                async move {
                    let result = admin.cancel(actor, id).await?;
                    Ok(json!({"result": result}))
                }
            })
            .await
        }
        JobsCommand::Discard { ids, out } => {
            for_each(ids, out.json, "discarded", |id| {
                let actor = &actor;
                async move {
                    admin.discard(actor, id).await?;
                    Ok(json!({}))
                }
            })
            .await
        }
    }
}

/// Runs `op` on every id, reports each, and fails if any failed.
async fn for_each<F, Fut>(ids: Vec<String>, as_json: bool, verb: &str, op: F) -> anyhow::Result<()>
where
    F: Fn(JobId) -> Fut,
    Fut: std::future::Future<Output = conveyor_admin::Result<serde_json::Value>>,
{
    let mut failed = 0usize;
    let mut report = Vec::new();
    for raw in &ids {
        let outcome = match parse_id(raw) {
            Ok(id) => op(id).await.map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(mut detail) => {
                if !as_json {
                    let extra = detail
                        .as_object()
                        .and_then(|o| o.values().next())
                        .and_then(|v| v.as_str())
                        .map(|s| format!(" ({s})"))
                        .unwrap_or_default();
                    outln!("{raw}: {verb}{extra}");
                }
                detail["id"] = json!(raw);
                detail["ok"] = json!(true);
                report.push(detail);
            }
            Err(e) => {
                failed += 1;
                if !as_json {
                    errln!("{raw}: error: {e}");
                }
                report.push(json!({"id": raw, "ok": false, "error": e.to_string()}));
            }
        }
    }
    if as_json {
        output::json(&report)?;
    }
    if failed > 0 {
        bail!("{failed} of {} failed", ids.len());
    }
    Ok(())
}

/// `conveyor dead …`
pub async fn dead(admin: &Admin, cmd: DeadCommand) -> anyhow::Result<()> {
    let store = admin.store();
    match cmd {
        DeadCommand::List { filter, page, out } => {
            let filter = build_filter(vec![JobState::Dead], &filter)?;
            let page = build_page(&page)?;
            let jobs = store.list(&filter, page).await?;
            if out.json {
                output::json(&jobs)
            } else {
                output::jobs_table(&jobs, page.limit);
                Ok(())
            }
        }
        DeadCommand::Retry {
            ids,
            filter,
            all,
            dry_run,
            out,
        } => {
            if !ids.is_empty() {
                if has_filter(&filter) || all {
                    return Err(crate::input::usage(
                        "give either job ids or filters (--queue, --kind, …/--all), not both",
                    ));
                }
                let mut filter = JobFilter::state(JobState::Dead);
                filter.ids = ids
                    .iter()
                    .map(|s| parse_id(s))
                    .collect::<anyhow::Result<_>>()?;
                return bulk(
                    admin,
                    filter,
                    dry_run,
                    out.json,
                    "retried",
                    BulkAction::Retry,
                )
                .await;
            }
            if !has_filter(&filter) && !all {
                return Err(crate::input::usage(
                    "name the dead jobs to retry: job ids, a filter (--queue, --kind, --error, --since …), or --all",
                ));
            }
            let filter = build_filter(vec![JobState::Dead], &filter)?;
            bulk(
                admin,
                filter,
                dry_run,
                out.json,
                "retried",
                BulkAction::Retry,
            )
            .await
        }
        DeadCommand::Purge {
            filter,
            all,
            dry_run,
            out,
        } => {
            if !has_filter(&filter) && !all {
                return Err(crate::input::usage(
                    "name the dead jobs to delete: a filter (--queue, --kind, --error, --until …), or --all",
                ));
            }
            let filter = build_filter(vec![JobState::Dead], &filter)?;
            bulk(
                admin,
                filter,
                dry_run,
                out.json,
                "purged",
                BulkAction::Discard,
            )
            .await
        }
    }
}

/// A bulk action over dead jobs, through the same admin operation as the API's.
async fn bulk(
    admin: &Admin,
    filter: JobFilter,
    dry_run: bool,
    as_json: bool,
    verb: &str,
    action: BulkAction,
) -> anyhow::Result<()> {
    let done = admin
        .bulk(
            &Actor::cli(),
            action,
            BulkRequest {
                filter,
                all: false,
                dry_run,
            },
        )
        .await?;
    let n = if dry_run { done.matched } else { done.affected };
    if as_json {
        output::json(&json!({ "matched": n, "dry_run": dry_run, "action": verb }))
    } else {
        if dry_run {
            outln!("{n} dead jobs would be {verb} (dry run: nothing changed)");
        } else {
            outln!("{n} dead jobs {verb}");
        }
        Ok(())
    }
}

/// `conveyor queues`
pub async fn queues(admin: &Admin, args: QueuesArgs) -> anyhow::Result<()> {
    let (name, paused, out) = match args.action {
        None => {
            let queues = admin.queues().await?;
            return if args.out.json {
                output::json(&queues)
            } else {
                output::queues_table(&queues);
                Ok(())
            };
        }
        Some(QueuesAction::Pause { name, out }) => (name, true, out),
        Some(QueuesAction::Resume { name, out }) => (name, false, out),
    };
    let settings = admin.set_queue_paused(&Actor::cli(), &name, paused).await?;
    if out.json {
        return output::json(&settings);
    }
    if paused {
        outln!(
            "paused queue `{name}`: workers fetch nothing from it (within a second); it keeps accepting jobs"
        );
    } else {
        outln!("resumed queue `{name}`");
    }
    Ok(())
}

/// `conveyor keys …`
pub async fn keys(admin: &Admin, cmd: KeysCommand) -> anyhow::Result<()> {
    use conveyor_admin::key::{self, Scope};
    match cmd {
        KeysCommand::Create {
            scope,
            name,
            queues,
            out,
        } => {
            let scope: Scope = scope.parse()?;
            let (k, token) = admin
                .create_key_for_queues(&Actor::cli(), &name, scope, &queues)
                .await?;
            if out.json {
                output::json(
                    &json!({ "key": token, "id": k.id, "name": k.name, "scope": k.scope, "queues": k.queues }),
                )
            } else {
                outln!("{token}");
                let only = k
                    .queues
                    .as_ref()
                    .map(|q| format!(" on queues {}", q.join(", ")))
                    .unwrap_or_default();
                errln!(
                    "created key {} `{}` with scope `{}`{only}. This is the only time the key is shown: store it now. Send it as `Authorization: Bearer <key>`.",
                    k.id,
                    k.name,
                    k.scope
                );
                Ok(())
            }
        }
        KeysCommand::List(out) => {
            let keys = key::list(admin.store()).await?;
            if out.json {
                output::json(&keys)
            } else {
                output::keys_table(&keys);
                Ok(())
            }
        }
        KeysCommand::Revoke { id, out } => {
            let k = admin.revoke_key(&Actor::cli(), &id).await?;
            if out.json {
                return output::json(&k);
            }
            outln!("key {} `{}` is revoked", k.id, k.name);
            Ok(())
        }
    }
}

/// `conveyor audit …`
pub async fn audit(store: Arc<dyn Store>, cmd: AuditCommand) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::List { limit, before, out } => {
            if !(1..=1000).contains(&limit) {
                return Err(crate::input::usage(format!(
                    "--limit must be between 1 and 1000, got {limit}"
                )));
            }
            let entries = conveyor_admin::audit::list(&store, before, limit).await?;
            if out.json {
                output::json(&entries)
            } else {
                output::audit_table(&entries, limit);
                Ok(())
            }
        }
    }
}
