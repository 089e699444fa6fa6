//! The store's clock, as this process sees it.
//!
//! Workers run on many machines, and their clocks drift apart. So every instant that another
//! process compares — when a lease expires, when a job is due, when an attempt ended — is
//! taken on one clock, the store's (as River and Oban do). Statements that run in the store
//! read its clock themselves (Postgres `now()`, Redis `TIME` inside the scripts). What a
//! process computes on its own (a retry's due time, the end of an attempt) is this machine's
//! clock plus an offset, measured with one [`Store::now`] round trip and refreshed regularly:
//! [`StoreClock`].

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::error::Result;
use crate::store::Store;

/// An offset this large between a machine's clock and the store's is worth a warning: the
/// machine's own timestamps (logs, metrics) disagree with the jobs' by that much.
pub const SKEW_WARNING: Duration = Duration::from_secs(1);

/// The store's clock estimated from this machine's: the local clock plus the last measured
/// offset. Before the first measurement the offset is zero (the local clock).
#[derive(Debug, Default)]
pub struct StoreClock {
    /// Store clock minus local clock, in microseconds.
    offset_us: AtomicI64,
    /// When the offset was last measured (monotonic clock, which no wall-clock step moves).
    synced: Mutex<Option<Instant>>,
}

impl StoreClock {
    /// A clock that reads the local clock until the first [`StoreClock::sync`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The store's clock now (estimated).
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.offset()
    }

    /// Store clock minus this machine's clock, as last measured.
    pub fn offset(&self) -> chrono::Duration {
        chrono::Duration::microseconds(self.offset_us.load(Ordering::Relaxed))
    }

    /// How long ago the offset was measured; `None` before the first measurement.
    pub fn age(&self) -> Option<Duration> {
        self.synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|at| at.elapsed())
    }

    /// Measures the offset with one [`Store::now`] round trip and returns it. The store's
    /// reading is taken as made halfway through the round trip, so the estimate is off by at
    /// most half the round trip.
    pub async fn sync(&self, store: &(impl Store + ?Sized)) -> Result<chrono::Duration> {
        let sent = Utc::now();
        let start = Instant::now();
        let theirs = store.now().await?;
        self.record(sent, start.elapsed(), theirs);
        Ok(self.offset())
    }

    /// The store's clock now, measuring the offset first when the last measurement is older
    /// than `max_age` (or there was none).
    pub async fn now_fresh(
        &self,
        store: &(impl Store + ?Sized),
        max_age: Duration,
    ) -> Result<DateTime<Utc>> {
        if self.age().is_none_or(|age| age > max_age) {
            self.sync(store).await?;
        }
        Ok(self.now())
    }

    /// Records a reading `theirs` of the store's clock made during a round trip that left at
    /// local time `sent` and took `rtt`.
    pub fn record(&self, sent: DateTime<Utc>, rtt: Duration, theirs: DateTime<Utc>) {
        let half = chrono::Duration::from_std(rtt / 2).unwrap_or_default();
        let offset = (theirs - (sent + half))
            .num_microseconds()
            .unwrap_or(i64::MAX);
        self.offset_us.store(offset, Ordering::Relaxed);
        *self.synced.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_is_measured_to_the_middle_of_the_round_trip() {
        let clock = StoreClock::new();
        assert!(clock.age().is_none());
        let sent = Utc::now();
        let theirs = sent + chrono::Duration::seconds(60) + chrono::Duration::milliseconds(5);
        clock.record(sent, Duration::from_millis(10), theirs);
        assert_eq!(clock.offset(), chrono::Duration::seconds(60));
        assert!(clock.age().is_some());
        let skew = clock.now() - Utc::now();
        assert!(
            (skew - chrono::Duration::seconds(60))
                .num_milliseconds()
                .abs()
                < 100
        );
    }
}
