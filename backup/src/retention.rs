//! Retention: which complete backups `prune` keeps (grandfather-father-son) and deletes.
//!
//! Per source, a backup is kept when any rule keeps it:
//! - `keep_last = N`: the N newest;
//! - `keep_daily = N`: the newest backup of each of the N newest UTC days that have one;
//! - `keep_weekly = N`: likewise per ISO week; `keep_monthly = N`: per calendar month;
//! - always: the newest backup that has been verified (`verify`, or `verify --restore`),
//!   whatever the rules say, so a prune never leaves only unverified backups behind.
//!
//! Deleting removes the manifest first: a half-deleted backup is no longer listed as
//! complete.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `[backup.retention]`: how many generations of each source `prune` keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// The newest N backups.
    pub keep_last: u32,
    /// The newest backup of each of the newest N days (UTC).
    pub keep_daily: u32,
    /// The newest backup of each of the newest N ISO weeks.
    pub keep_weekly: u32,
    /// The newest backup of each of the newest N months.
    pub keep_monthly: u32,
}

impl Retention {
    /// Whether any rule is set (`prune` refuses to run without one).
    pub fn is_configured(&self) -> bool {
        self.keep_last + self.keep_daily + self.keep_weekly + self.keep_monthly > 0
    }

    /// Refuses an empty retention: pruning with nothing to keep would delete every backup
    /// but the newest verified one.
    pub fn check(&self) -> Result<()> {
        if self.is_configured() {
            Ok(())
        } else {
            Err(Error::Config(
                "backup.retention keeps nothing: set keep_last, keep_daily, keep_weekly and/or keep_monthly (e.g. [backup.retention] keep_last = 7) before pruning".into(),
            ))
        }
    }
}

/// One backup as retention sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Its id.
    pub id: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Whether it has been verified.
    pub verified: bool,
}

/// Why a backup is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Among the newest `keep_last`.
    Last,
    /// The newest of its day.
    Daily,
    /// The newest of its ISO week.
    Weekly,
    /// The newest of its month.
    Monthly,
    /// The newest verified backup.
    NewestVerified,
}

/// What to keep (with why) and what to delete, of one source's backups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Kept ids, with the rules that keep each.
    pub keep: BTreeMap<String, Vec<Reason>>,
    /// Ids to delete, oldest first.
    pub delete: Vec<String>,
}

/// Applies `retention` to one source's backups (any order).
pub fn select(retention: &Retention, backups: &[Candidate]) -> Selection {
    let mut newest_first: Vec<&Candidate> = backups.iter().collect();
    newest_first.sort_by(|a, b| (b.started_at, &b.id).cmp(&(a.started_at, &a.id)));
    let mut keep: BTreeMap<String, Vec<Reason>> = BTreeMap::new();
    for c in newest_first.iter().take(retention.keep_last as usize) {
        keep.entry(c.id.clone()).or_default().push(Reason::Last);
    }
    let mut periodic = |n: u32, reason: Reason, period: &dyn Fn(DateTime<Utc>) -> (i32, u32)| {
        let mut seen = HashSet::new();
        for c in &newest_first {
            if seen.len() >= n as usize {
                break;
            }
            // The first (newest) backup of each period is the one kept.
            if seen.insert(period(c.started_at)) {
                keep.entry(c.id.clone()).or_default().push(reason);
            }
        }
    };
    periodic(retention.keep_daily, Reason::Daily, &|t| {
        (t.year(), t.ordinal())
    });
    periodic(retention.keep_weekly, Reason::Weekly, &|t| {
        let w = t.iso_week();
        (w.year(), w.week())
    });
    periodic(retention.keep_monthly, Reason::Monthly, &|t| {
        (t.year(), t.month())
    });
    if let Some(c) = newest_first.iter().find(|c| c.verified) {
        keep.entry(c.id.clone())
            .or_default()
            .push(Reason::NewestVerified);
    }
    let mut delete: Vec<String> = newest_first
        .iter()
        .rev()
        .filter(|c| !keep.contains_key(&c.id))
        .map(|c| c.id.clone())
        .collect();
    delete.dedup();
    Selection { keep, delete }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn c(id: &str, t: &str) -> Candidate {
        Candidate {
            id: id.into(),
            started_at: at(t),
            verified: false,
        }
    }

    fn kept(s: &Selection) -> Vec<&str> {
        s.keep.keys().map(String::as_str).collect()
    }

    /// Two backups a day at 03:00 and 15:00 from 2026-01-01 (a Thursday) to 2026-03-31.
    fn twice_daily() -> Vec<Candidate> {
        let mut all = Vec::new();
        let mut day = at("2026-01-01T00:00:00Z");
        while day < at("2026-04-01T00:00:00Z") {
            for hour in [3, 15] {
                let t = day + chrono::Duration::hours(hour);
                all.push(c(&t.format("%m%d-%H").to_string(), &t.to_rfc3339()));
            }
            day += chrono::Duration::days(1);
        }
        all
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        let r = Retention {
            keep_last: 3,
            ..Retention::default()
        };
        let s = select(&r, &twice_daily());
        assert_eq!(kept(&s), ["0330-15", "0331-03", "0331-15"]);
        assert_eq!(s.delete.len(), 180 - 3);
        assert_eq!(s.delete[0], "0101-03", "oldest first");
    }

    #[test]
    fn daily_weekly_monthly_keep_the_newest_of_each_period() {
        let r = Retention {
            keep_daily: 3,
            keep_weekly: 2,
            keep_monthly: 3,
            ..Retention::default()
        };
        let s = select(&r, &twice_daily());
        // Days: 31, 30, 29 March (their 15:00 backups). Weeks (ISO, Monday first): the week
        // of Monday 30 March -> 31st; the week of 23 March -> Sunday 29th. Months: March ->
        // 31st, February -> 28th, January -> 31st.
        assert_eq!(
            kept(&s),
            ["0131-15", "0228-15", "0329-15", "0330-15", "0331-15"]
        );
        assert_eq!(
            s.keep["0331-15"],
            [Reason::Daily, Reason::Weekly, Reason::Monthly]
        );
        assert_eq!(s.keep["0329-15"], [Reason::Daily, Reason::Weekly]);
        assert_eq!(s.keep["0228-15"], [Reason::Monthly]);
        assert_eq!(s.delete.len(), 180 - 5);
    }

    #[test]
    fn periods_without_backups_do_not_count() {
        // Backups on 1, 2 and 10 January only: keep_daily = 2 keeps the 10th and the 2nd.
        let all = vec![
            c("a", "2026-01-01T10:00:00Z"),
            c("b", "2026-01-02T10:00:00Z"),
            c("c", "2026-01-10T10:00:00Z"),
        ];
        let r = Retention {
            keep_daily: 2,
            ..Retention::default()
        };
        let s = select(&r, &all);
        assert_eq!(kept(&s), ["b", "c"]);
        assert_eq!(s.delete, ["a"]);
    }

    #[test]
    fn the_newest_verified_backup_is_always_kept() {
        let mut all = twice_daily();
        // Only two old backups were ever verified.
        for v in ["0105-03", "0110-15"] {
            all.iter_mut().find(|c| c.id == v).unwrap().verified = true;
        }
        let r = Retention {
            keep_last: 1,
            ..Retention::default()
        };
        let s = select(&r, &all);
        assert_eq!(kept(&s), ["0110-15", "0331-15"]);
        assert_eq!(s.keep["0110-15"], [Reason::NewestVerified]);
        assert!(s.delete.contains(&"0105-03".to_string()));
    }

    #[test]
    fn an_empty_retention_is_refused() {
        let err = Retention::default().check().unwrap_err().to_string();
        assert!(err.contains("backup.retention"), "{err}");
        assert!(
            Retention {
                keep_monthly: 1,
                ..Retention::default()
            }
            .check()
            .is_ok()
        );
    }
}
