//! Human tables and JSON output.

use chrono::{DateTime, Utc};
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
use conveyor_worker::Job;
use conveyor_worker::JobState;
use serde::Serialize;

/// Prints `value` as pretty JSON on one or more lines.
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    t
}

/// `2026-11-23 10:04:05Z` (UTC, seconds).
pub fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

fn opt_time(t: Option<DateTime<Utc>>) -> String {
    t.map(time).unwrap_or_else(|| "-".into())
}

fn clip(s: &str, max: usize) -> String {
    let line = s.lines().next().unwrap_or("");
    if line.chars().count() <= max {
        line.to_string()
    } else {
        let cut: String = line.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// One page of jobs; points at the next page when this one is full.
pub fn jobs_table(jobs: &[Job], page_size: u32) {
    if jobs.is_empty() {
        outln!("no jobs match");
        return;
    }
    let mut t = table(&[
        "id",
        "state",
        "queue",
        "kind",
        "attempt",
        "run at",
        "last error",
    ]);
    for job in jobs {
        t.add_row(vec![
            job.id.to_string(),
            job.state.to_string(),
            job.queue.clone(),
            job.kind.clone(),
            format!("{}/{}", job.attempt, job.max_attempts),
            time(job.run_at),
            last_error(job),
        ]);
    }
    outln!("{t}");
    if let Some(last) = jobs.last().filter(|_| jobs.len() >= page_size as usize) {
        outln!("next page: --before {}", last.id);
    }
}

/// The last error in a list's narrow column: its message and, when it has causes, the root
/// cause, which is what usually says what to fix (`sending attempt 3: connection refused`).
fn last_error(job: &Job) -> String {
    let Some(failed) = job.attempts.iter().rev().find(|a| a.error.is_some()) else {
        return "-".into();
    };
    let message = failed.error.as_deref().unwrap_or_default();
    match failed.causes.last() {
        Some(root) if !message.contains(root.as_str()) => {
            format!("{}: {}", clip(message, 30), clip(root, 50))
        }
        _ => clip(message, 60),
    }
}

/// One job with its history.
pub fn job_detail(job: &Job) {
    let rows: Vec<(&str, String)> = vec![
        ("id", job.id.to_string()),
        ("state", job.state.to_string()),
        ("queue", job.queue.clone()),
        ("kind", job.kind.clone()),
        ("args", job.args.to_string()),
        ("priority", job.priority.to_string()),
        (
            "attempt",
            format!("{} of {}", job.attempt, job.max_attempts),
        ),
        ("run at", time(job.run_at)),
        ("created at", time(job.created_at)),
        ("attempted at", opt_time(job.attempted_at)),
        ("finalized at", opt_time(job.finalized_at)),
        (
            "lease",
            match (&job.lease_owner, job.lease_expires_at) {
                (Some(owner), Some(until)) => format!("{owner} until {}", time(until)),
                _ => "-".into(),
            },
        ),
        ("cancel requested", opt_time(job.cancel_requested_at)),
        (
            "idempotency key",
            job.idempotency_key.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "tags",
            if job.tags.is_empty() {
                "-".into()
            } else {
                job.tags.join(", ")
            },
        ),
        ("metadata", job.metadata.to_string()),
        (
            "progress",
            match &job.progress {
                Some(p) => format!(
                    "{:.0}%{} (attempt {}, {})",
                    p.percent,
                    p.message
                        .as_deref()
                        .map(|m| format!(" {m}"))
                        .unwrap_or_default(),
                    p.attempt,
                    time(p.updated_at)
                ),
                None => "-".into(),
            },
        ),
        (
            "result",
            job.result
                .as_ref()
                .map_or_else(|| "-".into(), ToString::to_string),
        ),
    ];
    for (k, v) in rows {
        outln!("{k:>17}  {v}");
    }
    if job.attempts.is_empty() {
        outln!("\nno finished attempts yet");
        return;
    }
    outln!();
    let mut t = table(&["#", "started", "took", "worker", "outcome", "error"]);
    for a in &job.attempts {
        let mut error = a.error.clone().unwrap_or_else(|| "-".into());
        for cause in &a.causes {
            error.push_str("\n  caused by: ");
            error.push_str(cause);
        }
        t.add_row(vec![
            a.attempt.to_string(),
            time(a.started_at),
            format!("{} ms", a.duration_ms),
            a.worker.clone().unwrap_or_else(|| "-".into()),
            serde_json::to_value(a.outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            error,
        ]);
    }
    outln!("{t}");
    for a in &job.attempts {
        if let Some(tb) = &a.traceback {
            outln!("\ntraceback of attempt {}:\n{}", a.attempt, tb.trim_end());
        }
    }
}

/// Queue counts.
pub fn queues_table(queues: &[conveyor_admin::queue::QueueOverview]) {
    if queues.is_empty() {
        outln!("no queues have jobs yet");
        return;
    }
    let mut header = vec!["queue"];
    header.extend(JobState::ALL.iter().map(|s| s.as_str()));
    header.push("oldest ready");
    header.push("unserved");
    let mut t = table(&header);
    for q in queues {
        let name = if q.paused {
            format!("{} (paused)", q.stats.queue)
        } else {
            q.stats.queue.clone()
        };
        let mut row = vec![name];
        for st in JobState::ALL {
            row.push(q.stats.counts.get(&st).copied().unwrap_or(0).to_string());
        }
        row.push(
            q.stats
                .oldest_available_age
                .map(|d| {
                    humantime::format_duration(std::time::Duration::from_secs(d.as_secs()))
                        .to_string()
                })
                .unwrap_or_else(|| "-".into()),
        );
        // Jobs wait here and no live worker fetches from this queue.
        row.push(if q.unserved { "yes" } else { "-" }.to_string());
        t.add_row(row);
    }
    outln!("{t}");
}

/// Schedules (with their status) as a table.
pub fn schedules_table(rows: &[conveyor_scheduler::registry::ScheduleStatus]) {
    let mut t = table(&[
        "name",
        "cron",
        "zone",
        "queue / kind",
        "enabled",
        "last fire",
        "last outcome",
        "next fire",
    ]);
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or("-".to_string(), |t| {
            t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
        })
    };
    for r in rows {
        let spec = &r.schedule.spec;
        t.add_row(vec![
            spec.name.clone(),
            spec.cron.clone(),
            spec.timezone.clone(),
            format!("{} / {}", spec.queue, spec.kind),
            if spec.enabled {
                "yes".to_string()
            } else {
                r.schedule
                    .disabled_reason
                    .as_deref()
                    .map_or("paused".to_string(), |why| format!("no ({why})"))
            },
            time(r.last_fire),
            match (r.last_job, r.last_state) {
                (Some(_), Some(state)) => state.to_string(),
                (Some(_), None) => "pruned".into(),
                _ => "-".into(),
            },
            time(r.next_fire),
        ]);
    }
    outln!("{t}");
}

/// API keys.
pub fn keys_table(keys: &[conveyor_admin::key::ApiKey]) {
    if keys.is_empty() {
        outln!("no keys; create one with `conveyor keys create --scope read --name NAME`");
        return;
    }
    let mut t = table(&["id", "name", "scope", "created", "revoked"]);
    for k in keys {
        t.add_row(vec![
            k.id.clone(),
            k.name.clone(),
            match &k.queues {
                Some(q) => format!("{} ({})", k.scope, q.join(", ")),
                None => k.scope.to_string(),
            },
            time(k.created_at),
            opt_time(k.revoked_at),
        ]);
    }
    outln!("{t}");
}

/// Audit records, newest first; points at the next page when this one is full.
pub fn audit_table(entries: &[conveyor_admin::audit::AuditEntry], page_size: u32) {
    if entries.is_empty() {
        outln!("no audit records");
        return;
    }
    let mut t = table(&["at", "who", "from", "action", "affected", "target"]);
    for e in entries {
        t.add_row(vec![
            time(e.at),
            e.actor.name.clone(),
            e.actor.address.clone().unwrap_or_else(|| "-".into()),
            e.action.clone(),
            e.affected.to_string(),
            clip(&e.target.to_string(), 80),
        ]);
    }
    outln!("{t}");
    if entries.len() == page_size as usize
        && let Some(last) = entries.last()
    {
        outln!("more: --before {}", last.id);
    }
}
