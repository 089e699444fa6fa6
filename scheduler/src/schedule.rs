//! Cron schedules: what a schedule is, when it fires, and which job each tick enqueues.
//!
//! A [`ScheduleSpec`] is what users write (config file, API, CLI). [`ScheduleSpec::compile`]
//! validates it and returns a [`Schedule`] that answers "when next?" and "what is due now?".
//!
//! # Expressions
//! - Standard 5-field cron (`minute hour day-of-month month day-of-week`), where day-of-week
//!   is `0`–`7` with `0` and `7` both Sunday, or names (`MON-FRI`).
//! - The `cron` crate's 6- or 7-field form with seconds first (and an optional year), where
//!   day-of-week numbers run `1`–`7` from Sunday. Prefer names there to avoid the ambiguity.
//!
//! Days follow cronie/Vixie cron: when both day-of-month and day-of-week are restricted
//! (neither starts with `*` or `?`), a day matching **either** fires (`0 0 1,15 * MON`: the
//! 1st, the 15th and every Monday); otherwise both must match (`0 0 1 * */2`: a 1st that is a
//! Sunday, Tuesday, Thursday or Saturday).
//!
//! # Time zones and daylight saving
//! Expressions are read in the schedule's IANA zone (default `UTC`). As in cronie, an entry
//! whose hour field names single hours is a *fixed-time* entry; one whose hour is `*`, a range
//! or a step is not.
//! - A wall-clock time that does not exist (skipped by a spring change, e.g. 02:30 in
//!   `Europe/Berlin` on the last Sunday of March): a fixed-time entry fires **once, at the
//!   first instant after the gap** (03:00 CEST); other entries have no such tick (their next
//!   tick after the gap follows as usual).
//! - A wall-clock time that exists twice (an autumn change): a fixed-time entry fires
//!   **once**, at its first occurrence; other entries fire at **both** occurrences (`*/15`
//!   runs 01:00–01:45 EDT and again 01:00–01:45 EST in `America/New_York`).
//!
//! # Exactly one job per tick
//! Each tick's job carries the idempotency key `schedule:<name>:<instant in UTC>`, so any
//! number of schedulers can enqueue the same tick and the store keeps one job.

use std::str::FromStr;

use chrono::{DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use conveyor_worker::NewJob;
use serde::{Deserialize, Serialize};

/// What to do about ticks that passed while no scheduler was running.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MissedPolicy {
    /// Fire none of them; wait for the next tick.
    Skip,
    /// Fire one job for the most recent missed tick.
    #[default]
    Latest,
    /// Fire every missed tick, oldest first, up to `backfill_limit`.
    All,
}

/// What to do when a tick comes while the previous tick's job has not finished.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OverlapPolicy {
    /// Enqueue anyway.
    #[default]
    Allow,
    /// Skip this tick.
    Skip,
}

/// A schedule as users write it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Unique name.
    pub name: String,
    /// Cron expression (5 fields, or 6–7 with seconds first).
    pub cron: String,
    /// IANA time zone the expression is read in.
    #[serde(default = "utc")]
    pub timezone: String,
    /// Queue of the jobs it enqueues.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// Kind of the jobs it enqueues.
    pub kind: String,
    /// Arguments of the jobs it enqueues.
    #[serde(default = "empty_object")]
    pub args: serde_json::Value,
    /// Priority of the jobs (smaller runs first).
    #[serde(default)]
    pub priority: i16,
    /// Attempt budget of the jobs.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: i32,
    /// Disabled schedules fire nothing.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Missed ticks.
    #[serde(default)]
    pub missed: MissedPolicy,
    /// Most ticks one backfill enqueues with [`MissedPolicy::All`].
    #[serde(default = "default_backfill_limit")]
    pub backfill_limit: u32,
    /// Overlapping runs.
    #[serde(default)]
    pub overlap: OverlapPolicy,
}

fn utc() -> String {
    "UTC".into()
}
fn default_queue() -> String {
    "default".into()
}
fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}
fn default_max_attempts() -> i32 {
    conveyor_worker::job::DEFAULT_MAX_ATTEMPTS
}
fn yes() -> bool {
    true
}
fn default_backfill_limit() -> u32 {
    100
}

/// The longest cron expression accepted, in bytes: far more than any real schedule needs
/// (every minute of an hour listed one by one is 170), short enough that parsing and
/// evaluating it stays cheap whatever is sent.
pub const MAX_CRON_LEN: usize = 512;

/// A schedule field that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("schedule `{schedule}`: invalid {field}: {message}")]
pub struct ScheduleError {
    /// The schedule's name, as given.
    pub schedule: String,
    /// The offending field (`name`, `cron`, `timezone`, …).
    pub field: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ScheduleSpec {
    /// A schedule of `kind` on `cron`, in UTC, on the `default` queue, with the defaults.
    pub fn new(name: impl Into<String>, cron: impl Into<String>, kind: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            cron: cron.into(),
            timezone: utc(),
            queue: default_queue(),
            kind: kind.into(),
            args: empty_object(),
            priority: 0,
            max_attempts: default_max_attempts(),
            enabled: true,
            missed: MissedPolicy::default(),
            backfill_limit: default_backfill_limit(),
            overlap: OverlapPolicy::default(),
        }
    }

    /// Validates every field and prepares the expression.
    pub fn compile(&self) -> Result<Schedule, ScheduleError> {
        let err = |field: &'static str, message: String| ScheduleError {
            schedule: self.name.clone(),
            field,
            message,
        };
        for (field, value) in [
            ("name", &self.name),
            ("queue", &self.queue),
            ("kind", &self.kind),
        ] {
            conveyor_worker::job::check_name(field, value)
                .map_err(|e| err(field, e.to_string()))?;
        }
        if self.max_attempts < 1 {
            return Err(err(
                "max_attempts",
                format!("{} is less than 1; use at least 1", self.max_attempts),
            ));
        }
        if self.missed == MissedPolicy::All && self.backfill_limit == 0 {
            return Err(err(
                "backfill_limit",
                "0 would backfill nothing; use at least 1, or missed = \"skip\"".into(),
            ));
        }
        let tz = Tz::from_str(self.timezone.trim()).map_err(|_| {
            err(
                "timezone",
                format!(
                    "`{}` is not an IANA time zone name; use e.g. `UTC`, `Europe/Berlin` or `America/New_York`",
                    self.timezone
                ),
            )
        })?;
        if self.cron.len() > MAX_CRON_LEN {
            return Err(err(
                "cron",
                format!(
                    "is {} bytes long; at most {MAX_CRON_LEN} are accepted (write long lists as ranges and steps, e.g. `0-30/5`)",
                    self.cron.len()
                ),
            ));
        }
        let expr = normalize(&self.cron).map_err(|m| err("cron", m))?;
        let cron = cron::Schedule::from_str(&expr)
            .map_err(|e| err("cron", format!("`{}`: {}", self.cron, explain(&e))))?;
        // As written: normalizing turns a day-of-week `*/2` into names, but Vixie cron's day
        // rule depends on whether the field starts with `*`.
        let fields: Vec<&str> = self.cron.split_whitespace().collect();
        let schedule = Schedule {
            spec: self.clone(),
            times: Times::new(&cron, &fields),
            tz,
        };
        if schedule.fires_after(Utc::now()).next().is_none() {
            return Err(err(
                "cron",
                format!("`{}` never fires after now", self.cron),
            ));
        }
        Ok(schedule)
    }
}

/// Turns a 5-field expression into the 6-field form the `cron` crate reads (seconds first,
/// day-of-week as names); passes 6- and 7-field expressions through.
fn normalize(expr: &str) -> Result<String, String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    match fields.len() {
        5 => {
            let dow = day_of_week_names(fields[4])?;
            Ok(format!(
                "0 {} {} {} {} {dow}",
                fields[0], fields[1], fields[2], fields[3]
            ))
        }
        6 | 7 => Ok(fields.join(" ")),
        0 => Err("is empty; write e.g. `*/5 * * * *` (every 5 minutes)".into()),
        n => Err(format!(
            "`{expr}` has {n} fields; use 5 (minute hour day-of-month month day-of-week) or 6-7 (seconds first, optional year)"
        )),
    }
}

/// Each field as the `cron` crate names it in errors: our name and its valid range.
const FIELD_RANGES: [(&str, &str, u32, u32); 7] = [
    ("Seconds", "second", 0, 59),
    ("Minutes", "minute", 0, 59),
    ("Hours", "hour", 0, 23),
    ("Days of Month", "day-of-month", 1, 31),
    ("Months", "month", 1, 12),
    (
        "Days of Week",
        "day-of-week (seconds-first form: 1 = Sunday)",
        1,
        7,
    ),
    ("Years", "year", 1970, 2100),
];

/// The `cron` crate's parse error in our words. Its range errors state the wrong bound
/// ("Minutes must be less than 59" for 60, though 59 is valid), and its syntax errors end with
/// a caret line that means nothing without the line above it.
fn explain(e: &cron::error::Error) -> String {
    let text = e.to_string();
    let line = text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.chars().all(|c| c == '^' || c.is_whitespace()))
        .unwrap_or("unparseable");
    for (crate_name, name, min, max) in FIELD_RANGES {
        let Some(rest) = line.strip_prefix(crate_name) else {
            continue;
        };
        if rest.starts_with(" must be less than ")
            || rest.starts_with(" must be greater than or equal to ")
        {
            let value = rest
                .split_once("('")
                .and_then(|(_, v)| v.split_once('\''))
                .map_or("", |(v, _)| v);
            return format!("{name} {value} is out of range; use {min}-{max}");
        }
        if rest.starts_with(" must be between 1 and ") {
            // Only steps are checked this way.
            let value = rest
                .split_once("('")
                .and_then(|(_, v)| v.split_once('\''))
                .map_or("", |(v, _)| v);
            return format!("{name} step {value} is out of range; use 1-{max}");
        }
    }
    if let Some(range) = line.strip_prefix("Invalid range for ")
        && let Some((crate_name, values)) = range.split_once(": ")
        && let Some((_, name, min, max)) = FIELD_RANGES.iter().find(|f| f.0 == crate_name)
    {
        return format!(
            "{name} range {values} is invalid; both ends must be within {min}-{max}, low to high"
        );
    }
    // A bare echo of the expression with a caret under the part it could not read (a year
    // outside the crate's range gives nothing more).
    let lines: Vec<&str> = text.lines().collect();
    if let [expr, caret] = lines[..]
        && let Some(col) = caret.find('^')
    {
        let token = expr
            .get(col..)
            .and_then(|t| t.split_whitespace().next())
            .unwrap_or("");
        return format!(
            "cannot read `{token}`; ranges are second 0-59, minute 0-59, hour 0-23, \
             day-of-month 1-31, month 1-12, year 1970-2100"
        );
    }
    line.to_string()
}

const DAY_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// A standard day-of-week field (`0`–`7`, `0` and `7` = Sunday, names, `*`, lists, ranges,
/// steps) as a list of day names, which every cron dialect reads the same way.
fn day_of_week_names(field: &str) -> Result<String, String> {
    if field == "*" || field == "?" {
        return Ok(field.to_string());
    }
    let day = |s: &str| -> Result<usize, String> {
        if let Ok(n) = s.parse::<usize>() {
            return if n <= 7 {
                Ok(n % 7)
            } else {
                Err(format!(
                    "day-of-week {n} is out of range; use 0-7 (0 and 7 are Sunday) or SUN-SAT"
                ))
            };
        }
        DAY_NAMES
            .iter()
            .position(|d| d.eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("`{s}` is not a day of the week; use 0-7 or SUN-SAT"))
    };
    let mut days = [false; 7];
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<usize>().ok().filter(|s| *s > 0).ok_or_else(|| {
                    format!("step `{s}` in day-of-week must be a positive number")
                })?,
            ),
            None => (item, 1),
        };
        let (from, to) = match range {
            "*" => (0, 6),
            r => match r.split_once('-') {
                Some((a, b)) => {
                    let a = day(a)?;
                    // `5-7` means Friday to Sunday: 7 closes a range at the week's end.
                    let b = if b == "7" { 7 } else { day(b)? };
                    if b < a {
                        return Err(format!("day-of-week range `{r}` runs backwards"));
                    }
                    (a, b)
                }
                None if step > 1 => (day(r)?, 6),
                None => {
                    let d = day(r)?;
                    (d, d)
                }
            },
        };
        for d in (from..=to).step_by(step) {
            days[d % 7] = true;
        }
    }
    Ok(days
        .iter()
        .enumerate()
        .filter(|(_, on)| **on)
        .map(|(d, _)| DAY_NAMES[d])
        .collect::<Vec<_>>()
        .join(","))
}

/// The next fire times of a schedule, as [`Schedule::upcoming`] answers them.
#[derive(Clone, Debug, PartialEq)]
pub struct Upcoming {
    /// The fire instants, in the schedule's zone, soonest first.
    pub times: Vec<DateTime<Tz>>,
    /// Set when the schedule fires fewer times than asked: what it does instead, to say
    /// beside a short (or empty) list rather than leave it unexplained.
    pub note: Option<String>,
}

/// A validated schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    spec: ScheduleSpec,
    times: Times,
    tz: Tz,
}

/// The fields of an expression as sets, and the crontab rules that decide how they combine.
///
/// The `cron` crate parses the fields; we match dates and times ourselves because its matching
/// differs from cronie/Vixie cron (which "standard 5-field cron" promises) in three ways: it
/// requires both day fields to match, it drops a fixed time that a spring change skips, and it
/// runs a repeated hour only once even for a wildcard hour.
#[derive(Clone, Debug)]
struct Times {
    seconds: Vec<u32>,
    minutes: Vec<u32>,
    hours: Vec<u32>,
    /// Index 1–31.
    days_of_month: [bool; 32],
    /// Index 1–12.
    months: [bool; 13],
    /// Index 0–6 from Sunday.
    days_of_week: [bool; 7],
    /// Ascending; the crate's range (1970–2100) when the expression has no year field.
    years: Vec<u32>,
    /// Both day fields restricted (neither starts with `*` or `?`): a day matching either one
    /// fires, as in Vixie cron.
    either_day: bool,
    /// The hour field names single hours (no `*`, range or step): a time in a spring gap
    /// fires at the gap's end, a repeated time fires only at its first occurrence.
    fixed_hour: bool,
}

impl Times {
    fn new(cron: &cron::Schedule, fields: &[&str]) -> Self {
        use cron::TimeUnitSpec;
        // 5 fields: m h dom mon dow; 6-7 fields: s m h dom mon dow [year].
        let shift = usize::from(fields.len() != 5);
        let (hour, dom, dow) = (fields[1 + shift], fields[2 + shift], fields[4 + shift]);
        let restricted = |f: &str| !(f.starts_with('*') || f.starts_with('?'));
        let mut days_of_month = [false; 32];
        cron.days_of_month()
            .iter()
            .for_each(|d| days_of_month[d as usize] = true);
        let mut months = [false; 13];
        cron.months().iter().for_each(|m| months[m as usize] = true);
        let mut days_of_week = [false; 7];
        // The crate numbers days of the week 1-7 from Sunday.
        cron.days_of_week()
            .iter()
            .for_each(|d| days_of_week[(d as usize + 6) % 7] = true);
        Self {
            seconds: cron.seconds().iter().collect(),
            minutes: cron.minutes().iter().collect(),
            hours: cron.hours().iter().collect(),
            days_of_month,
            months,
            days_of_week,
            years: cron.years().iter().collect(),
            either_day: restricted(dom) && restricted(dow),
            fixed_hour: !hour.contains(['*', '?', '-', '/']),
        }
    }

    fn day_matches(&self, d: NaiveDate) -> bool {
        let dom = self.days_of_month[d.day() as usize];
        let dow = self.days_of_week[d.weekday().num_days_from_sunday() as usize];
        if self.either_day {
            dom || dow
        } else {
            dom && dow
        }
    }

    /// The first day on or after `from` on which the expression fires, if any.
    fn next_day(&self, mut from: NaiveDate) -> Option<NaiveDate> {
        loop {
            let year = u32::try_from(from.year()).ok()?;
            if !self.years.contains(&year) {
                let next = *self.years.iter().find(|y| **y > year)?;
                from = NaiveDate::from_ymd_opt(i32::try_from(next).ok()?, 1, 1)?;
                continue;
            }
            if !self.months[from.month() as usize] {
                from = from
                    .with_day(1)?
                    .checked_add_months(chrono::Months::new(1))?;
                continue;
            }
            if self.day_matches(from) {
                return Some(from);
            }
            from = from.succ_opt()?;
        }
    }

    /// The instants at which hour `hour` of day `day` fires in `tz`, ascending, applying the
    /// daylight-saving rules of the module docs.
    /// Local times before `not_before` are known to fire before the instant asked about, and
    /// are left out.
    fn hour_instants(
        &self,
        tz: Tz,
        day: NaiveDate,
        hour: u32,
        not_before: NaiveDateTime,
    ) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        for &m in &self.minutes {
            for &s in &self.seconds {
                let Some(local) = day.and_hms_opt(hour, m, s).filter(|l| *l >= not_before) else {
                    continue;
                };
                match tz.from_local_datetime(&local) {
                    LocalResult::Single(t) => out.push(t.with_timezone(&Utc)),
                    LocalResult::Ambiguous(a, b) => {
                        let (a, b) = (a.with_timezone(&Utc), b.with_timezone(&Utc));
                        out.push(a.min(b));
                        if !self.fixed_hour {
                            out.push(a.max(b));
                        }
                    }
                    LocalResult::None => {
                        if self.fixed_hour
                            && let Some(t) = gap_end(tz, local)
                        {
                            out.push(t);
                        }
                    }
                }
            }
        }
        // A repeated hour yields its two passes interleaved; several gap times share one
        // instant.
        out.sort();
        out.dedup();
        out
    }
}

/// The first instant after the daylight-saving gap that skips the local time `local`.
fn gap_end(tz: Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    let offset = |utc: NaiveDateTime| tz.offset_from_utc_datetime(&utc).fix().local_minus_utc();
    let before = offset(local.checked_sub_signed(chrono::Duration::days(1))?);
    let after = offset(local.checked_add_signed(chrono::Duration::days(1))?);
    // The change happens in (local - after, local - before], read as UTC: bisect to the second.
    let mut lo = local.checked_sub_signed(chrono::Duration::seconds(after.into()))?;
    let mut hi = local.checked_sub_signed(chrono::Duration::seconds(before.into()))?;
    if hi <= lo {
        return None;
    }
    while hi - lo > chrono::Duration::seconds(1) {
        let mid = lo + (hi - lo) / 2;
        if offset(mid) == before {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(Utc.from_utc_datetime(&hi))
}

impl Schedule {
    /// The spec it was compiled from.
    pub fn spec(&self) -> &ScheduleSpec {
        &self.spec
    }

    /// Its time zone.
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// Fire instants strictly after `after`, in order, following the day and daylight-saving
    /// rules in the module docs. Ends when the expression has no more (a year field in the
    /// past, or 2100 reached).
    pub fn fires_after(&self, after: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        let tz = self.tz;
        let times = &self.times;
        // No instant after `after` shows a local time earlier than `after` under the smallest
        // offset in force around it: earlier local times need not be worked out (a 1-second
        // schedule asks for its next tick ten times a second).
        let not_before = [-1, 0, 1]
            .iter()
            .filter_map(|d| after.checked_add_signed(chrono::Duration::days(*d)))
            .map(|t| {
                tz.offset_from_utc_datetime(&t.naive_utc())
                    .fix()
                    .local_minus_utc()
            })
            .min()
            .and_then(|o| {
                after
                    .naive_utc()
                    .checked_add_signed(chrono::Duration::seconds(o.into()))
            })
            .unwrap_or(NaiveDateTime::MIN);
        let mut day = times.next_day(not_before.date());
        let mut hour = 0;
        let mut pending = std::collections::VecDeque::new();
        let mut last = after;
        std::iter::from_fn(move || {
            loop {
                if let Some(t) = pending.pop_front() {
                    // Instants at or before `after` (earlier in its day), or before one already
                    // given (a zone moving back more than the chunk), are not fired.
                    if t > last {
                        last = t;
                        return Some(t);
                    }
                    continue;
                }
                let d = day?;
                let Some(&h) = times.hours.get(hour) else {
                    day = d.succ_opt().and_then(|next| times.next_day(next));
                    hour = 0;
                    continue;
                };
                hour += 1;
                if d.and_hms_opt(h, 59, 59).is_some_and(|end| end < not_before) {
                    continue;
                }
                // Chunks of an hour keep a repeated hour's two passes in order.
                pending.extend(times.hour_instants(tz, d, h, not_before));
            }
        })
    }

    /// The next `n` fire instants after `after`, in the schedule's zone.
    pub fn next(&self, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Tz>> {
        self.fires_after(after)
            .take(n)
            .map(|t| t.with_timezone(&self.tz))
            .collect()
    }

    /// The next `n` fire instants after `after`, and whether the expression stops firing
    /// before `n` (a year field, or the end of the cron crate's range in the year 2100).
    pub fn upcoming(&self, after: DateTime<Utc>, n: usize) -> Upcoming {
        let times = self.next(after, n);
        let note = (times.len() < n).then(|| {
            let name = &self.spec.name;
            match times.last() {
                None => format!("`{name}` never fires after {}", after.to_rfc3339()),
                Some(last) => format!(
                    "`{name}` fires only {} time(s) after {}; none after {}",
                    times.len(),
                    after.to_rfc3339(),
                    last.to_rfc3339()
                ),
            }
        });
        Upcoming { times, note }
    }

    /// The ticks to enqueue at `now`, given the last tick already handled (`None`: the
    /// schedule is new, and fires from its next tick on). Applies the missed-tick policy.
    pub fn due(&self, last: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        if !self.spec.enabled {
            return Vec::new();
        }
        let Some(last) = last else {
            return Vec::new();
        };
        let passed = self.fires_after(last).take_while(|t| *t <= now);
        match self.spec.missed {
            MissedPolicy::All => passed.take(self.spec.backfill_limit as usize).collect(),
            MissedPolicy::Latest => passed.last().into_iter().collect(),
            MissedPolicy::Skip => {
                // Only a tick that is due right now (within a grace of a few seconds) fires.
                passed
                    .last()
                    .filter(|t| now.signed_duration_since(*t) <= chrono::Duration::seconds(5))
                    .into_iter()
                    .collect()
            }
        }
    }

    /// The idempotency key of the tick at `at`.
    pub fn tick_key(&self, at: DateTime<Utc>) -> String {
        format!(
            "schedule:{}:{}",
            self.spec.name,
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )
    }

    /// The tag every job of this schedule carries (`schedule:<name>`): the newest such job
    /// tells a starting scheduler which tick fired last.
    pub fn tag(&self) -> String {
        format!("schedule:{}", self.spec.name)
    }

    /// The job the tick at `at` enqueues.
    pub fn job(&self, at: DateTime<Utc>) -> NewJob {
        NewJob::new(self.spec.kind.clone(), self.spec.args.clone())
            .queue(self.spec.queue.clone())
            .priority(self.spec.priority)
            .max_attempts(self.spec.max_attempts)
            .idempotency_key(self.tick_key(at))
            .tags([self.tag()])
            .metadata(serde_json::json!({
                "schedule": self.spec.name,
                "tick": at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, Timelike};

    #[test]
    fn a_cron_expression_has_a_length_limit() {
        // Valid, and long: the same minute listed over and over.
        let long = format!("{}0 * * * *", "0,".repeat(2_000));
        let e = ScheduleSpec::new("long", long, "k").compile().unwrap_err();
        assert_eq!(e.field, "cron");
        assert!(e.message.contains("at most 512"), "{e}");
        let fits = format!("{}0 * * * *", "0,".repeat(200));
        ScheduleSpec::new("fits", fits, "k").compile().unwrap();
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn berlin(cron: &str) -> Schedule {
        let mut spec = ScheduleSpec::new("nightly", cron, "report.build");
        spec.timezone = "Europe/Berlin".into();
        spec.compile().unwrap()
    }

    #[test]
    fn five_field_expressions_use_standard_weekdays() {
        let s = ScheduleSpec::new("weekly", "0 9 * * 1", "k")
            .compile()
            .unwrap();
        let next = s.next(at("2026-11-22T12:00:00Z"), 3);
        assert!(
            next.iter()
                .all(|t| t.weekday() == chrono::Weekday::Mon && t.hour() == 9),
            "{next:?}"
        );
        for (field, days) in [
            ("0", "SUN"),
            ("7", "SUN"),
            ("1-5", "MON,TUE,WED,THU,FRI"),
            ("5-7", "SUN,FRI,SAT"),
            ("*/2", "SUN,TUE,THU,SAT"),
            ("1-5/2", "MON,WED,FRI"),
            ("mon,Wed", "MON,WED"),
            ("*", "*"),
        ] {
            assert_eq!(day_of_week_names(field).unwrap(), days, "{field}");
        }
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases: Vec<(ScheduleSpec, &str, &str)> = vec![
            (
                ScheduleSpec::new("a", "61 * * * *", "k"),
                "cron",
                "minute 61",
            ),
            (ScheduleSpec::new("a", "* * *", "k"), "cron", "3 fields"),
            (ScheduleSpec::new("a", "", "k"), "cron", "empty"),
            (
                ScheduleSpec::new("a", "0 9 * * 8", "k"),
                "cron",
                "out of range",
            ),
            (
                ScheduleSpec::new("bad name!", "* * * * *", "k"),
                "name",
                "name",
            ),
            (
                ScheduleSpec {
                    timezone: "Mars/Olympus".into(),
                    ..ScheduleSpec::new("a", "* * * * *", "k")
                },
                "timezone",
                "Europe/Berlin",
            ),
            (
                ScheduleSpec {
                    max_attempts: 0,
                    ..ScheduleSpec::new("a", "* * * * *", "k")
                },
                "max_attempts",
                "at least 1",
            ),
        ];
        for (spec, field, hint) in cases {
            let e = spec.compile().unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().contains(hint), "{e}");
        }
    }

    #[test]
    fn error_texts_state_the_true_range() {
        for (cron, says) in [
            ("60 * * * *", "minute 60 is out of range; use 0-59"),
            ("0 24 * * *", "hour 24 is out of range; use 0-23"),
            ("0 0 32 * *", "day-of-month 32 is out of range; use 1-31"),
            ("0 0 0 * *", "day-of-month 0 is out of range; use 1-31"),
            ("0 0 * 13 *", "month 13 is out of range; use 1-12"),
            ("60 0 0 * * *", "second 60 is out of range; use 0-59"),
            (
                "50-61 * * * *",
                "minute range 50-61 is invalid; both ends must be within 0-59",
            ),
            ("*/61 * * * *", "minute step 61 is out of range; use 1-59"),
            ("0 0 0 * * * 2200", "cannot read `2200`"),
        ] {
            let e = ScheduleSpec::new("a", cron, "k")
                .compile()
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "`{cron}`: {e}");
            assert!(!e.contains("less than"), "`{cron}`: {e}");
        }
        // The largest values are valid.
        ScheduleSpec::new("a", "59 23 31 12 7", "k")
            .compile()
            .unwrap();
    }

    #[test]
    fn a_skipped_fixed_time_fires_at_the_end_of_the_gap() {
        // Europe/Berlin skips 02:00-03:00 on 2026-03-29: the 02:30 nightly still runs, at
        // 03:00 CEST, as in cronie.
        let s = berlin("30 2 * * *");
        let fires: Vec<String> = s
            .next(at("2026-03-27T12:00:00Z"), 3)
            .iter()
            .map(|t| t.format("%F %T %Z").to_string())
            .collect();
        assert_eq!(
            fires,
            [
                "2026-03-28 02:30:00 CET",
                "2026-03-29 03:00:00 CEST",
                "2026-03-30 02:30:00 CEST"
            ]
        );
    }

    #[test]
    fn a_repeated_fixed_time_fires_once_and_a_wildcard_hour_twice() {
        // Europe/Berlin repeats 02:00-03:00 on 2026-10-25.
        let s = berlin("30 2 * * *");
        let fires: Vec<DateTime<Utc>> = s.fires_after(at("2026-10-23T12:00:00Z")).take(3).collect();
        assert_eq!(
            fires,
            [
                at("2026-10-24T00:30:00Z"),
                at("2026-10-25T00:30:00Z"), // 02:30 CEST, the first of the two
                at("2026-10-26T01:30:00Z"),
            ]
        );
        // Every 15 minutes: both passes of the repeated hour run, and time never goes back.
        let s = berlin("*/15 * * * *");
        let fires: Vec<DateTime<Utc>> = s.fires_after(at("2026-10-24T23:50:00Z")).take(9).collect();
        assert!(fires.windows(2).all(|w| w[0] < w[1]), "{fires:?}");
        assert_eq!(fires[0], at("2026-10-25T00:00:00Z")); // 02:00 CEST
        assert_eq!(fires[3], at("2026-10-25T00:45:00Z")); // 02:45 CEST
        assert_eq!(fires[4], at("2026-10-25T01:00:00Z")); // 02:00 CET
        assert_eq!(fires[8], at("2026-10-25T02:00:00Z")); // 03:00 CET
        // Starting inside the repeated hour yields nothing earlier than the start.
        let inside = at("2026-10-25T01:20:00Z"); // 02:20 CET
        assert!(s.fires_after(inside).take(3).all(|t| t > inside));
    }

    #[test]
    fn starting_anywhere_gives_the_same_sequence() {
        // Starting points across both of New York's 2026 changes, every 7 min 13 s: the next
        // tick from each is the one the sequence from the day before gives.
        for (cron, day_before) in [
            ("*/15 * * * *", "2026-10-31T00:00:00Z"),
            ("30 1-2 * * *", "2026-10-31T00:00:00Z"),
            ("30 2 * * *", "2026-03-07T00:00:00Z"),
            ("*/20 * * * * *", "2026-03-07T00:00:00Z"),
        ] {
            let mut spec = ScheduleSpec::new("s", cron, "k");
            spec.timezone = "America/New_York".into();
            let s = spec.compile().unwrap();
            let start = at(day_before);
            let all: Vec<DateTime<Utc>> = s
                .fires_after(start)
                .take_while(|t| *t < start + chrono::Duration::days(3))
                .collect();
            let mut from = start;
            while from < start + chrono::Duration::days(2) {
                let expected = all.iter().find(|t| **t > from).copied();
                assert_eq!(s.fires_after(from).next(), expected, "{cron} after {from}");
                from += chrono::Duration::seconds(433);
            }
        }
    }

    #[test]
    fn missed_ticks_follow_the_policy() {
        let mut spec = ScheduleSpec::new("m", "0 * * * *", "k");
        let last = at("2026-11-22T10:00:00Z");
        let now = at("2026-11-22T13:30:00Z"); // 11:00, 12:00 and 13:00 were missed
        assert_eq!(
            spec.compile().unwrap().due(Some(last), now),
            [at("2026-11-22T13:00:00Z")],
            "latest is the default"
        );
        spec.missed = MissedPolicy::All;
        spec.backfill_limit = 2;
        assert_eq!(
            spec.compile().unwrap().due(Some(last), now),
            [at("2026-11-22T11:00:00Z"), at("2026-11-22T12:00:00Z")]
        );
        spec.missed = MissedPolicy::Skip;
        assert!(spec.compile().unwrap().due(Some(last), now).is_empty());
        assert_eq!(
            spec.compile()
                .unwrap()
                .due(Some(last), at("2026-11-22T13:00:02Z")),
            [at("2026-11-22T13:00:00Z")],
            "skip still fires the tick that is due now"
        );
        spec.enabled = false;
        assert!(spec.compile().unwrap().due(Some(last), now).is_empty());
    }

    #[test]
    fn each_tick_has_one_key_and_its_job_says_where_it_came_from() {
        let s = ScheduleSpec::new("digest", "*/5 * * * *", "mail.digest")
            .compile()
            .unwrap();
        let tick = at("2026-11-22T10:05:00Z");
        assert_eq!(s.tick_key(tick), "schedule:digest:2026-11-22T10:05:00Z");
        let job = s.job(tick);
        assert_eq!(job.kind, "mail.digest");
        assert_eq!(
            job.idempotency_key.as_deref(),
            Some(s.tick_key(tick).as_str())
        );
        assert_eq!(job.metadata["schedule"], "digest");
        assert_eq!(job.tags, ["schedule:digest"]);
        job.validate().unwrap();
    }
}
