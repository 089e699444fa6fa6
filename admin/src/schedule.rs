//! Schedule changes: create, update, delete, pause, resume, trigger. The schedule rules
//! themselves (fields, cron, versions) are `conveyor_scheduler::registry`'s; this adds the
//! enqueue rule (no reserved kind or queue) and the audit record.

use conveyor_scheduler::registry::{Origin, SchedulePatch, Schedules, StoredSchedule};
use conveyor_scheduler::schedule::ScheduleSpec;
use conveyor_worker::Enqueued;
use serde_json::json;

use crate::{Actor, Admin, Error, Result};

impl Admin {
    fn schedules(&self) -> Schedules {
        Schedules::new(self.store.clone())
    }

    /// The schedule named `name`, or [`Error::UnknownName`] listing the names that exist.
    pub async fn schedule(&self, name: &str) -> Result<StoredSchedule> {
        let registry = self.schedules();
        if let Some(s) = registry.get(name).await? {
            return Ok(s);
        }
        match registry.require(name).await {
            Ok(s) => Ok(s),
            Err(conveyor_worker::Error::InvalidInput { message, .. }) => {
                Err(Error::UnknownName(message))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A schedule's jobs follow the enqueue rules: no reserved kind or queue, and args its
    /// kind's check accepts.
    fn check_schedule(&self, spec: &ScheduleSpec) -> Result<()> {
        conveyor_jobs::check_reserved_names(&spec.kind, &spec.queue, &self.webhooks.config().queue)
            .map_err(|r| conveyor_worker::Error::invalid(r.field, r.message))?;
        self.validators.check(&spec.kind, &spec.args)?;
        Ok(())
    }

    async fn audit_schedule(&self, actor: &Actor, action: &str, name: &str) -> Result<()> {
        self.audit(actor, action, json!({ "schedule": name }), 1)
            .await
    }

    /// Stores a new schedule `name` firing `kind` on `cron`, with `patch`'s other fields.
    /// Audited as `schedule.create`.
    pub async fn create_schedule(
        &self,
        actor: &Actor,
        name: String,
        cron: String,
        kind: String,
        patch: SchedulePatch,
    ) -> Result<StoredSchedule> {
        let spec = patch.apply(&ScheduleSpec::new(name, cron, kind))?;
        self.check_schedule(&spec)?;
        let stored = self.schedules().create(spec, Origin::Api).await?;
        self.audit_schedule(actor, "schedule.create", &stored.spec.name)
            .await?;
        Ok(stored)
    }

    /// Applies `patch` to schedule `name` if it is still at `expect_version` (default: the
    /// version just read). Returns the stored schedule and the one it replaced (whose origin
    /// says whether the config file will put it back). Audited as `schedule.update`.
    pub async fn update_schedule(
        &self,
        actor: &Actor,
        name: &str,
        patch: SchedulePatch,
        expect_version: Option<i64>,
    ) -> Result<(StoredSchedule, StoredSchedule)> {
        let current = self.schedule(name).await?;
        let spec = patch.apply(&current.spec)?;
        self.check_schedule(&spec)?;
        let stored = self
            .schedules()
            .update(name, spec, Some(expect_version.unwrap_or(current.version)))
            .await?;
        self.audit_schedule(actor, "schedule.update", name).await?;
        Ok((stored, current))
    }

    /// Deletes schedule `name` (its jobs stay); returns what was deleted. Audited as
    /// `schedule.delete`.
    pub async fn delete_schedule(&self, actor: &Actor, name: &str) -> Result<StoredSchedule> {
        let current = self.schedule(name).await?;
        self.schedules().delete(name).await?;
        self.audit_schedule(actor, "schedule.delete", name).await?;
        Ok(current)
    }

    /// Resumes (`enabled`) or pauses schedule `name`. Audited as `schedule.resume` /
    /// `schedule.pause`.
    pub async fn set_schedule_enabled(
        &self,
        actor: &Actor,
        name: &str,
        enabled: bool,
    ) -> Result<StoredSchedule> {
        self.schedule(name).await?;
        let stored = self.schedules().set_enabled(name, enabled).await?;
        let action = if enabled {
            "schedule.resume"
        } else {
            "schedule.pause"
        };
        self.audit_schedule(actor, action, name).await?;
        Ok(stored)
    }

    /// Enqueues one job of schedule `name` now. Audited as `schedule.trigger`.
    pub async fn trigger_schedule(&self, actor: &Actor, name: &str) -> Result<Enqueued> {
        self.schedule(name).await?;
        let enqueued = self.schedules().trigger(name).await?;
        self.audit_schedule(actor, "schedule.trigger", name).await?;
        Ok(enqueued)
    }
}
