//! Schedules kept in the store, so every scheduler replica, the CLI and the API see the same
//! set (collection `schedules` of the store's shared records, one record per name).
//!
//! Schedules come from three places, recorded as their [`Origin`]:
//! - `config`: `[[schedules]]` in the config file, reconciled into the store when a
//!   scheduler starts ([`Schedules::reconcile`]): created or updated to match the file, and
//!   those no longer in the file **disabled** (not deleted, so their history stays
//!   attached), with the reason recorded.
//! - `api`: created through the CLI or the HTTP API; reconciliation leaves them alone.
//! - `builtin`: examples seeded once into a fresh store ([`Schedules::seed_builtin`]);
//!   deleting one keeps it deleted.
//!
//! Every write is a versioned compare-and-set, so two admins (or two starting replicas)
//! never silently overwrite each other.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use conveyor_worker::store::meta::{Expect, Put, Record, list_all};
use conveyor_worker::store::{JobFilter, Page};
use conveyor_worker::{Enqueued, Error, JobId, JobState, Result, Store};
use serde::{Deserialize, Serialize};

use crate::schedule::{Schedule, ScheduleSpec};

/// The collection schedules live in.
pub const COLLECTION: &str = "schedules";
/// Marks a store whose built-in schedules were seeded (collection `settings`).
const SEEDED: &str = "builtin-schedules-v1";

/// Where a stored schedule came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The config file's `[[schedules]]`.
    Config,
    /// The CLI or the HTTP API.
    Api,
    /// Seeded into a fresh store.
    Builtin,
}

/// A schedule as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredSchedule {
    /// What it fires and when (its `enabled` flag is the pause switch).
    pub spec: ScheduleSpec,
    /// Where it came from.
    pub origin: Origin,
    /// Why it was disabled by the system (e.g. removed from the config file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was last enabled after being disabled: ticks before this are not fired late.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_at: Option<DateTime<Utc>>,
    /// The store's version of this record (for updates that must not lose a race).
    #[serde(skip)]
    pub version: i64,
}

impl StoredSchedule {
    fn from_record(record: &Record) -> Result<Self> {
        let mut s: StoredSchedule = record.decode()?;
        s.version = record.version;
        Ok(s)
    }
}

/// What a schedule did last and will do next.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleStatus {
    /// The schedule.
    #[serde(flatten)]
    pub schedule: StoredSchedule,
    /// The tick of its newest job, if any is left.
    pub last_fire: Option<DateTime<Utc>>,
    /// That job.
    pub last_job: Option<JobId>,
    /// That job's state now (its outcome once finished).
    pub last_state: Option<JobState>,
    /// The next tick, if enabled.
    pub next_fire: Option<DateTime<Utc>>,
}

/// A change to a schedule's fields, as the CLI flags and the API body give it: fields left
/// `None` keep their value. The name is not here: schedules are not renamed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SchedulePatch {
    /// Cron expression.
    pub cron: Option<String>,
    /// Job kind.
    pub kind: Option<String>,
    /// IANA time zone.
    pub timezone: Option<String>,
    /// Queue of the jobs.
    pub queue: Option<String>,
    /// Job arguments.
    pub args: Option<serde_json::Value>,
    /// Job priority.
    pub priority: Option<i16>,
    /// Attempt budget of each job.
    pub max_attempts: Option<i32>,
    /// Paused (`false`) or firing.
    pub enabled: Option<bool>,
    /// `skip`, `latest` or `all`, as written.
    pub missed: Option<String>,
    /// Backfill limit for `missed = all`.
    pub backfill_limit: Option<u32>,
    /// `allow` or `skip`, as written.
    pub overlap: Option<String>,
}

impl SchedulePatch {
    /// `base` with the patch applied, every field checked; errors name the field.
    pub fn apply(self, base: &ScheduleSpec) -> Result<ScheduleSpec> {
        let mut spec = base.clone();
        macro_rules! set {
            ($($field:ident),*) => {
                $(if let Some(v) = self.$field {
                    spec.$field = v;
                })*
            };
        }
        set!(
            cron,
            kind,
            timezone,
            queue,
            args,
            priority,
            max_attempts,
            enabled,
            backfill_limit
        );
        if let Some(v) = self.missed {
            spec.missed = serde_json::from_value(serde_json::Value::String(v.clone()))
                .map_err(|_| Error::invalid("missed", format!("`{v}`: use skip, latest or all")))?;
        }
        if let Some(v) = self.overlap {
            spec.overlap = serde_json::from_value(serde_json::Value::String(v.clone()))
                .map_err(|_| Error::invalid("overlap", format!("`{v}`: use allow or skip")))?;
        }
        spec.compile().map_err(invalid)?;
        Ok(spec)
    }
}

/// What [`Schedules::reconcile`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// Newly stored.
    pub created: Vec<String>,
    /// Updated to match the file.
    pub updated: Vec<String>,
    /// Stored from the file earlier, gone from it now: disabled.
    pub disabled: Vec<String>,
}

/// The schedules in a store.
#[derive(Clone)]
pub struct Schedules {
    store: Arc<dyn Store>,
}

fn invalid(e: crate::schedule::ScheduleError) -> Error {
    Error::invalid(e.field, format!("schedule `{}`: {}", e.schedule, e.message))
}

impl Schedules {
    /// The schedules of `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Every stored schedule, by name.
    pub async fn list(&self) -> Result<Vec<StoredSchedule>> {
        list_all(self.store.as_ref(), COLLECTION)
            .await?
            .iter()
            .map(StoredSchedule::from_record)
            .collect()
    }

    /// One schedule, or `None`.
    pub async fn get(&self, name: &str) -> Result<Option<StoredSchedule>> {
        self.store
            .meta_get(COLLECTION, name)
            .await?
            .map(|r| StoredSchedule::from_record(&r))
            .transpose()
    }

    /// One schedule, or a not-found error that lists what exists.
    pub async fn require(&self, name: &str) -> Result<StoredSchedule> {
        if let Some(s) = self.get(name).await? {
            return Ok(s);
        }
        let known: Vec<String> = self
            .list()
            .await?
            .into_iter()
            .map(|s| s.spec.name)
            .collect();
        Err(Error::invalid(
            "name",
            if known.is_empty() {
                format!(
                    "no schedule is named `{name}`; none exist yet (create one with `conveyor schedules create`)"
                )
            } else {
                format!("no schedule is named `{name}`; known: {}", known.join(", "))
            },
        ))
    }

    /// Stores a new schedule; refuses an invalid one or a name in use.
    pub async fn create(&self, spec: ScheduleSpec, origin: Origin) -> Result<StoredSchedule> {
        spec.compile().map_err(invalid)?;
        let stored = StoredSchedule {
            spec,
            origin,
            disabled_reason: None,
            created_at: Utc::now(),
            resumed_at: None,
            version: 0,
        };
        self.write(stored, Expect::Absent).await
    }

    /// Replaces a schedule's spec (the name stays). `expect_version` guards against a
    /// concurrent change; `None` takes the current version.
    pub async fn update(
        &self,
        name: &str,
        spec: ScheduleSpec,
        expect_version: Option<i64>,
    ) -> Result<StoredSchedule> {
        if spec.name != name {
            return Err(Error::invalid(
                "name",
                format!(
                    "a schedule cannot be renamed (`{name}` → `{}`); create a new one and delete the old",
                    spec.name
                ),
            ));
        }
        spec.compile().map_err(invalid)?;
        let mut current = self.require(name).await?;
        let version = expect_version.unwrap_or(current.version);
        if spec.enabled && !current.spec.enabled {
            // On the store's clock, which the cron service compares ticks with.
            current.resumed_at = Some(self.store.now().await?);
        }
        current.spec = spec;
        current.disabled_reason = None;
        self.write(current, Expect::Version(version)).await
    }

    /// Enables (resume) or disables (pause) a schedule.
    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<StoredSchedule> {
        self.set_enabled_at(name, enabled, self.store.now().await?)
            .await
    }

    /// [`Schedules::set_enabled`] as if the clock read `now` (ticks before a resume at `now`
    /// are not fired).
    pub async fn set_enabled_at(
        &self,
        name: &str,
        enabled: bool,
        now: DateTime<Utc>,
    ) -> Result<StoredSchedule> {
        let mut current = self.require(name).await?;
        let version = current.version;
        if enabled && !current.spec.enabled {
            current.resumed_at = Some(now);
        }
        current.spec.enabled = enabled;
        current.disabled_reason = None;
        self.write(current, Expect::Version(version)).await
    }

    /// Deletes a schedule (its jobs stay). Returns whether it existed.
    pub async fn delete(&self, name: &str) -> Result<bool> {
        self.store.meta_delete(COLLECTION, name, Expect::Any).await
    }

    /// Enqueues one job of the schedule now, outside its ticks (also when paused). The job
    /// carries the schedule's tag, and `metadata.trigger = "manual"` instead of a tick.
    pub async fn trigger(&self, name: &str) -> Result<Enqueued> {
        let stored = self.require(name).await?;
        let schedule = stored.spec.compile().map_err(invalid)?;
        let now = Utc::now();
        let mut job = schedule.job(now);
        job.idempotency_key = None;
        job.metadata = serde_json::json!({
            "schedule": stored.spec.name,
            "trigger": "manual",
            "triggered_at": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        });
        self.store.enqueue(job).await
    }

    /// The schedule with its last fire, last outcome and next fire at `now`.
    pub async fn status(
        &self,
        stored: StoredSchedule,
        now: DateTime<Utc>,
    ) -> Result<ScheduleStatus> {
        let last = last_tick_job(self.store.as_ref(), &stored.spec.name).await?;
        let next_fire = match stored.spec.compile() {
            Ok(s) if stored.spec.enabled => s.fires_after(now).next(),
            _ => None,
        };
        let (last_fire, last_job, last_state) = match last {
            Some((tick, id, state)) => (Some(tick), Some(id), Some(state)),
            None => (None, None, None),
        };
        Ok(ScheduleStatus {
            schedule: stored,
            last_fire,
            last_job,
            last_state,
            next_fire,
        })
    }

    /// Makes the stored `config`-origin schedules match the file: creates and updates those
    /// in `specs`, disables those no longer there. Schedules of other origins with a name in
    /// the file are taken over by the file (it is the operator's latest word).
    pub async fn reconcile(&self, specs: &[ScheduleSpec]) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        for spec in specs {
            spec.compile().map_err(invalid)?;
        }
        for spec in specs {
            loop {
                let result = match self.get(&spec.name).await? {
                    None => {
                        report.created.push(spec.name.clone());
                        self.create(spec.clone(), Origin::Config).await.map(|_| ())
                    }
                    Some(current)
                        if current.spec == *spec
                            && current.origin == Origin::Config
                            && current.disabled_reason.is_none() =>
                    {
                        Ok(())
                    }
                    Some(current) => {
                        report.updated.push(spec.name.clone());
                        let version = current.version;
                        let resumed_at = if spec.enabled && !current.spec.enabled {
                            Some(self.store.now().await?)
                        } else {
                            current.resumed_at
                        };
                        let next = StoredSchedule {
                            spec: spec.clone(),
                            origin: Origin::Config,
                            disabled_reason: None,
                            resumed_at,
                            ..current
                        };
                        self.write(next, Expect::Version(version)).await.map(|_| ())
                    }
                };
                match result {
                    Ok(()) => break,
                    // Another replica reconciled the same file at the same moment: look again.
                    Err(Error::Conflict(_)) => {
                        report.created.retain(|n| n != &spec.name);
                        report.updated.retain(|n| n != &spec.name);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        for stored in self.list().await? {
            if stored.origin != Origin::Config
                || !stored.spec.enabled
                || specs.iter().any(|s| s.name == stored.spec.name)
            {
                continue;
            }
            let name = stored.spec.name.clone();
            let version = stored.version;
            let mut next = stored;
            next.spec.enabled = false;
            next.disabled_reason = Some("removed from the config file".into());
            match self.write(next, Expect::Version(version)).await {
                Ok(_) => report.disabled.push(name),
                Err(Error::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }

    /// Stores `builtin` once per store: the first call on a fresh store writes them, later
    /// calls (and later starts) do nothing, so an operator's deletions stick. Returns the
    /// names written.
    pub async fn seed_builtin(&self, builtin: &[ScheduleSpec]) -> Result<Vec<String>> {
        let marker = serde_json::json!({ "at": Utc::now() });
        match self
            .store
            .meta_put(Put::new("settings", SEEDED, &marker).expect(Expect::Absent))
            .await
        {
            Ok(_) => {}
            Err(Error::Conflict(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
        let mut written = Vec::new();
        for spec in builtin {
            match self.create(spec.clone(), Origin::Builtin).await {
                Ok(_) => written.push(spec.name.clone()),
                Err(Error::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }

    /// The enabled schedules, compiled, with when each was last resumed. A stored schedule
    /// that no longer compiles (e.g. a time zone this binary does not know) is skipped with a
    /// warning.
    pub async fn active(&self) -> Result<Vec<(Schedule, Option<DateTime<Utc>>)>> {
        let mut out = Vec::new();
        for stored in self.list().await? {
            if !stored.spec.enabled {
                continue;
            }
            match stored.spec.compile() {
                Ok(s) => out.push((s, stored.resumed_at)),
                Err(e) => tracing::warn!(error = %e, "stored schedule skipped"),
            }
        }
        Ok(out)
    }

    async fn write(&self, stored: StoredSchedule, expect: Expect) -> Result<StoredSchedule> {
        let value = serde_json::to_value(&stored)?;
        let record = self
            .store
            .meta_put(Put::new(COLLECTION, &stored.spec.name, &value).expect(expect))
            .await?;
        Ok(StoredSchedule {
            version: record.version,
            ..stored
        })
    }
}

/// The tick, id and current state of the newest job a schedule's ticks enqueued (manual
/// triggers skipped).
pub(crate) async fn last_tick_job(
    store: &dyn Store,
    name: &str,
) -> Result<Option<(DateTime<Utc>, JobId, JobState)>> {
    let page = store
        .list(
            &JobFilter {
                tag: Some(format!("schedule:{name}")),
                ..JobFilter::default()
            },
            Page {
                before: None,
                limit: 20,
            },
        )
        .await?;
    Ok(page.iter().find_map(|job| {
        let tick = job.metadata.get("tick")?.as_str()?;
        let tick = DateTime::parse_from_rfc3339(tick).ok()?.with_timezone(&Utc);
        Some((tick, job.id, job.state))
    }))
}

/// The example schedules a fresh store starts with, all disabled: turn one on with
/// `conveyor schedules resume NAME`. Maintenance kinds (analytics rollup, backup) add theirs
/// here as they land.
pub fn builtin() -> Vec<ScheduleSpec> {
    let mut hello = ScheduleSpec::new("example-hourly-echo", "0 * * * *", "demo.echo");
    hello.args = serde_json::json!({ "msg": "hello from the example-hourly-echo schedule" });
    hello.enabled = false;
    vec![hello]
}
