//! Finished-job summaries: what the platform's history is built from.
//!
//! [`crate::Store::finished_groups`] counts the jobs that finished in a time window, grouped
//! by queue, kind and final state, with two durations per job put into log buckets:
//!
//! - **run time**: `finalized_at − attempted_at`, the job's last attempt from claim to end;
//! - **wait**: `attempted_at − run_at`, how long that attempt waited after it was due.
//!
//! A job cancelled before it ever ran has neither. The buckets are [`BUCKETS_PER_OCTAVE`] per
//! doubling of microseconds ([`bucket_of`]), so a quantile read back from a [`Histogram`] is
//! within [`RELATIVE_ERROR`] of the exact one, and histograms of any windows merge by adding
//! counts: percentiles of a week come from a week of per-minute rows. Every backend computes
//! the bucket with the same formula (SQL on Postgres, Lua on Redis, Rust on SQLite); where a
//! value sits on a bucket's edge, floating point may put it in either neighbour, which stays
//! within the stated error.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::JobState;

/// Buckets per doubling.
pub const BUCKETS_PER_OCTAVE: u32 = 8;

/// The most a quantile read from a [`Histogram`] can be off, relative to the exact value:
/// half a bucket's width on a log scale, `2^(1/16) − 1` ≈ 4.4 %.
pub const RELATIVE_ERROR: f64 = 0.044_273_782_427_413_84;

/// The bucket of a duration in microseconds: `floor(8 · log2(max(µs, 1)))`. Zero holds
/// everything up to 1 µs; negative durations (clock steps) count as zero.
pub fn bucket_of(micros: i64) -> i32 {
    let us = micros.max(1) as f64;
    (f64::from(BUCKETS_PER_OCTAVE) * us.log2()).floor() as i32
}

/// The value a bucket stands for when read back: its geometric middle, in microseconds.
pub fn bucket_value(bucket: i32) -> f64 {
    if bucket <= 0 {
        return 1.0;
    }
    2f64.powf((f64::from(bucket) + 0.5) / f64::from(BUCKETS_PER_OCTAVE))
}

/// The bucket as a Postgres expression over an interval expression `interval`.
pub fn postgres_bucket_sql(interval: &str) -> String {
    format!(
        "floor({BUCKETS_PER_OCTAVE} * ln(greatest(extract(epoch FROM ({interval}))::float8 * 1e6, 1)) / ln(2))::int"
    )
}

/// Counts per bucket. Sparse: only buckets with counts are kept.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Histogram(pub BTreeMap<i32, u64>);

impl Histogram {
    /// Adds `n` observations to `bucket`.
    pub fn add(&mut self, bucket: i32, n: u64) {
        if n > 0 {
            *self.0.entry(bucket).or_insert(0) += n;
        }
    }

    /// Adds a duration in microseconds.
    pub fn record(&mut self, micros: i64) {
        self.add(bucket_of(micros), 1);
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (&b, &n) in &other.0 {
            self.add(b, n);
        }
    }

    /// How many observations.
    pub fn count(&self) -> u64 {
        self.0.values().sum()
    }

    /// The `q` quantile (0 ≤ q ≤ 1) in microseconds, within [`RELATIVE_ERROR`]; `None` when
    /// empty. The nearest-rank definition: the smallest value with at least `q · n`
    /// observations at or below it.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (&b, &c) in &self.0 {
            seen += c;
            if seen >= rank {
                return Some(bucket_value(b));
            }
        }
        self.0.keys().next_back().map(|&b| bucket_value(b))
    }
}

/// The finished jobs of one queue, kind and final state in a window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinishedGroup {
    /// The queue.
    pub queue: String,
    /// The kind.
    pub kind: String,
    /// `completed`, `cancelled` or `dead`.
    pub state: JobState,
    /// How many.
    pub count: u64,
    /// Run times of those that ran.
    pub run: Histogram,
    /// Waits of those that ran.
    pub wait: Histogram,
}

/// Collects per-job (or per-bucket) observations into [`FinishedGroup`]s; the backends share it.
#[derive(Debug, Default)]
pub struct GroupBuilder {
    groups: BTreeMap<(String, String, JobState), FinishedGroup>,
}

impl GroupBuilder {
    /// Adds `n` jobs of one group with the given buckets (`None`: never ran).
    pub fn add(
        &mut self,
        queue: &str,
        kind: &str,
        state: JobState,
        run_bucket: Option<i32>,
        wait_bucket: Option<i32>,
        n: u64,
    ) {
        let g = self
            .groups
            .entry((queue.to_owned(), kind.to_owned(), state))
            .or_insert_with(|| FinishedGroup {
                queue: queue.to_owned(),
                kind: kind.to_owned(),
                state,
                count: 0,
                run: Histogram::default(),
                wait: Histogram::default(),
            });
        g.count += n;
        if let Some(b) = run_bucket {
            g.run.add(b, n);
        }
        if let Some(b) = wait_bucket {
            g.wait.add(b, n);
        }
    }

    /// The groups, ordered by queue, kind and state.
    pub fn finish(self) -> Vec<FinishedGroup> {
        self.groups.into_values().collect()
    }
}

/// The finished jobs of one kind with one value of an args field and one final state in a
/// window ([`crate::Store::finished_groups_by_arg`]): webhook deliveries per endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgGroup {
    /// The field's value (`None`: absent, null or not a string).
    pub value: Option<String>,
    /// `completed`, `cancelled` or `dead`.
    pub state: JobState,
    /// How many jobs.
    pub count: u64,
    /// Their attempts, all together (a job delivered on its first attempt counts one).
    pub attempts: u64,
    /// Run times (last attempt, claim to end) of those that ran.
    pub run: Histogram,
}

/// Collects per-job (or per-bucket) observations into [`ArgGroup`]s; the backends share it.
#[derive(Debug, Default)]
pub struct ArgGroupBuilder {
    groups: BTreeMap<(Option<String>, JobState), ArgGroup>,
}

impl ArgGroupBuilder {
    /// Adds `n` jobs with `attempts` attempts between them and a run-time bucket (`None`:
    /// never ran).
    pub fn add(
        &mut self,
        value: Option<&str>,
        state: JobState,
        run_bucket: Option<i32>,
        n: u64,
        attempts: u64,
    ) {
        let g = self
            .groups
            .entry((value.map(str::to_owned), state))
            .or_insert_with(|| ArgGroup {
                value: value.map(str::to_owned),
                state,
                count: 0,
                attempts: 0,
                run: Histogram::default(),
            });
        g.count += n;
        g.attempts += attempts;
        if let Some(b) = run_bucket {
            g.run.add(b, n);
        }
    }

    /// The groups, ordered by value and state.
    pub fn finish(self) -> Vec<ArgGroup> {
        self.groups.into_values().collect()
    }
}

/// Whether `field` may name an args field in a grouped query: letters, digits and `_`.
pub fn valid_arg_field(field: &str) -> bool {
    !field.is_empty()
        && field
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_double_every_eight() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(-5), 0);
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(2), 8);
        assert_eq!(bucket_of(1024), 80);
        assert_eq!(bucket_of(1_000_000), 159);
    }

    #[test]
    fn quantiles_are_within_the_stated_error() {
        let mut values: Vec<i64> = (1..=10_000).map(|i| i * 37 + (i * i) % 1000).collect();
        let mut h = Histogram::default();
        for &v in &values {
            h.record(v);
        }
        values.sort_unstable();
        for q in [0.01, 0.5, 0.9, 0.95, 0.99, 1.0] {
            let rank = ((q * values.len() as f64).ceil() as usize).max(1);
            let exact = values[rank - 1] as f64;
            let got = h.quantile(q).unwrap();
            let err = (got - exact).abs() / exact;
            assert!(
                err <= RELATIVE_ERROR + 1e-9,
                "q={q}: {got} vs {exact} ({err})"
            );
        }
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn merged_histograms_equal_one_over_all_values() {
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        let mut all = Histogram::default();
        for v in 1..500 {
            let h = if v % 3 == 0 { &mut a } else { &mut b };
            h.record(v * 101);
            all.record(v * 101);
        }
        a.merge(&b);
        assert_eq!(a, all);
    }
}
