//! `conveyor schedules …`: the schedules stored in the store (see
//! `conveyor_scheduler::registry`), plus `next`, which answers from the config file when the
//! schedule is there and from the store otherwise.

use anyhow::bail;
use chrono::{DateTime, Utc};
use conveyor_admin::{Actor, Admin};
use conveyor_scheduler::registry::{Origin, SchedulePatch, ScheduleStatus, Schedules};
use conveyor_scheduler::schedule::Schedule;

use crate::cli::{ScheduleFields, SchedulesCommand};
use crate::config::Config;
use crate::output;

/// Whether `cmd` can be answered without the store (`next` for a config-file schedule).
pub fn from_config_only(config: &Config, cmd: &SchedulesCommand) -> bool {
    matches!(cmd, SchedulesCommand::Next { name, .. } if config.schedules.iter().any(|s| &s.name == name))
}

/// `schedules next` for a schedule of the config file.
pub fn next_from_config(config: &Config, cmd: SchedulesCommand) -> anyhow::Result<()> {
    let schedules = config.compiled_schedules()?;
    let SchedulesCommand::Next {
        name,
        count,
        after,
        out,
    } = cmd
    else {
        bail!("only `schedules next` is answered from the config file");
    };
    let schedule = schedules
        .iter()
        .find(|s| s.spec().name == name)
        .ok_or_else(|| {
            crate::input::usage(format!("no schedule is named `{name}` in the config"))
        })?;
    print_next(schedule, count, after, out.json)
}

fn print_next(
    schedule: &Schedule,
    count: u16,
    after: Option<DateTime<chrono::FixedOffset>>,
    json: bool,
) -> anyhow::Result<()> {
    let from = after.map_or_else(Utc::now, |t| t.with_timezone(&Utc));
    let upcoming = schedule.upcoming(from, usize::from(count));
    if let Some(note) = &upcoming.note {
        errln!("note: {note}");
    }
    let times = upcoming.times;
    if json {
        let times: Vec<String> = times.iter().map(|t| t.to_rfc3339()).collect();
        return output::json(&times);
    }
    for t in times {
        outln!("{}", t.format("%Y-%m-%d %H:%M:%S %Z (%:z)"));
    }
    Ok(())
}

/// The flags as a change to a schedule (the admin layer checks every field).
fn patch(fields: ScheduleFields) -> anyhow::Result<SchedulePatch> {
    let args = match fields.args {
        Some(v) => Some(crate::input::json_flag("--args", &v)?),
        None => None,
    };
    Ok(SchedulePatch {
        cron: fields.cron,
        kind: fields.kind,
        timezone: fields.timezone,
        queue: fields.queue,
        args,
        priority: fields.priority,
        max_attempts: fields.max_attempts,
        enabled: fields.disabled.then_some(false),
        missed: fields.missed,
        backfill_limit: fields.backfill_limit,
        overlap: fields.overlap,
    })
}

fn status_json(s: &ScheduleStatus) -> serde_json::Value {
    serde_json::to_value(s).unwrap_or_default()
}

fn print_status(s: &ScheduleStatus) {
    let spec = &s.schedule.spec;
    let time = |t: Option<DateTime<Utc>>| t.map_or("-".to_string(), |t| t.to_rfc3339());
    outln!("name:         {}", spec.name);
    outln!("cron:         {} ({})", spec.cron, spec.timezone);
    outln!("enqueues:     {} on queue {}", spec.kind, spec.queue);
    outln!("args:         {}", spec.args);
    outln!(
        "enabled:      {}{}",
        spec.enabled,
        s.schedule
            .disabled_reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    outln!("origin:       {}", origin(s.schedule.origin));
    outln!(
        "policies:     missed={:?} overlap={:?} priority={} max_attempts={}",
        spec.missed,
        spec.overlap,
        spec.priority,
        spec.max_attempts
    );
    outln!("last fire:    {}", time(s.last_fire));
    outln!(
        "last job:     {}",
        match (s.last_job, s.last_state) {
            (Some(id), Some(state)) => format!("{id} ({state})"),
            (Some(id), None) => format!("{id} (pruned)"),
            _ => "-".into(),
        }
    );
    outln!("next fire:    {}", time(s.next_fire));
}

fn origin(o: Origin) -> &'static str {
    match o {
        Origin::Config => "config file",
        Origin::Api => "api/cli",
        Origin::Builtin => "built-in example",
    }
}

/// Every other `schedules` subcommand, against the store.
pub async fn run(config: &Config, admin: &Admin, cmd: SchedulesCommand) -> anyhow::Result<()> {
    let registry = Schedules::new(admin.store().clone());
    let now = Utc::now();
    let actor = Actor::cli();
    match cmd {
        SchedulesCommand::List(out) => {
            let mut rows = Vec::new();
            for s in registry.list().await? {
                rows.push(registry.status(s, now).await?);
            }
            let pending: Vec<&str> = config
                .schedules
                .iter()
                .filter(|c| !rows.iter().any(|r| r.schedule.spec.name == c.name))
                .map(|c| c.name.as_str())
                .collect();
            if out.json {
                let rows: Vec<_> = rows.iter().map(status_json).collect();
                return output::json(&rows);
            }
            if rows.is_empty() {
                outln!(
                    "no schedules; create one with `conveyor schedules create`, or add [[schedules]] to the config file"
                );
            } else {
                output::schedules_table(&rows);
            }
            if !pending.is_empty() {
                outln!(
                    "in the config file, stored when a scheduler next starts: {}",
                    pending.join(", ")
                );
            }
            Ok(())
        }
        SchedulesCommand::Show { name, out } => {
            let s = admin.schedule(&name).await?;
            let status = registry.status(s, now).await?;
            if out.json {
                return output::json(&status_json(&status));
            }
            print_status(&status);
            Ok(())
        }
        SchedulesCommand::Create { name, fields, out } => {
            let (Some(cron), Some(kind)) = (fields.cron.clone(), fields.kind.clone()) else {
                return Err(crate::input::usage(
                    "`schedules create` needs --cron and --kind, e.g. --cron '0 3 * * *' --kind demo.echo",
                ));
            };
            let stored = admin
                .create_schedule(&actor, name, cron, kind, patch(fields)?)
                .await?;
            let status = registry.status(stored, now).await?;
            if out.json {
                return output::json(&status_json(&status));
            }
            outln!("created schedule `{}`", status.schedule.spec.name);
            print_status(&status);
            Ok(())
        }
        SchedulesCommand::Update { name, fields, out } => {
            let (stored, current) = admin
                .update_schedule(&actor, &name, patch(fields)?, None)
                .await?;
            if current.origin == Origin::Config {
                errln!(
                    "note: `{name}` comes from the config file; the next scheduler start puts the file's version back. Edit the file to make the change last."
                );
            }
            let status = registry.status(stored, now).await?;
            if out.json {
                return output::json(&status_json(&status));
            }
            outln!("updated schedule `{name}`");
            print_status(&status);
            Ok(())
        }
        SchedulesCommand::Delete { name, out } => {
            let current = admin.delete_schedule(&actor, &name).await?;
            if out.json {
                output::json(&serde_json::json!({ "deleted": current }))?;
            } else {
                outln!("deleted schedule `{name}` (its jobs stay)");
            }
            if current.origin == Origin::Config {
                errln!(
                    "note: `{name}` is in the config file; the next scheduler start stores it again. Remove it from the file to delete it for good."
                );
            }
            Ok(())
        }
        SchedulesCommand::Pause { name, out } => {
            let s = admin.set_schedule_enabled(&actor, &name, false).await?;
            if out.json {
                return output::json(&status_json(&registry.status(s, now).await?));
            }
            outln!("paused schedule `{name}`");
            Ok(())
        }
        SchedulesCommand::Resume { name, out } => {
            let s = admin.set_schedule_enabled(&actor, &name, true).await?;
            let status = registry.status(s, now).await?;
            if out.json {
                return output::json(&status_json(&status));
            }
            outln!(
                "resumed schedule `{name}`; next fire {}",
                status.next_fire.map_or("-".to_string(), |t| t.to_rfc3339())
            );
            Ok(())
        }
        SchedulesCommand::Trigger { name, out } => {
            let enqueued = admin.trigger_schedule(&actor, &name).await?;
            if out.json {
                return output::json(&enqueued);
            }
            outln!("enqueued job {} for schedule `{name}`", enqueued.id);
            Ok(())
        }
        SchedulesCommand::Next {
            name,
            count,
            after,
            out,
        } => {
            let stored = admin.schedule(&name).await?;
            let schedule = stored.spec.compile().map_err(|e| anyhow::anyhow!("{e}"))?;
            print_next(&schedule, count, after, out.json)
        }
    }
}
