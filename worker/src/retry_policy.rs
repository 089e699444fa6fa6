//! How long a failed job waits before its next attempt.
//!
//! The default is exponential backoff with jitter:
//!
//! ```text
//! delay(attempt) = min(max, base · factor^(attempt − 1)) · (1 + U(−jitter, +jitter))
//! ```
//!
//! With the defaults (base 2 s, factor 2, max 1 h, jitter 0.2) the waits after attempts
//! 1, 2, 3, … are about 2 s, 4 s, 8 s, 16 s, … reaching the 1 h cap after attempt 12; a job
//! with the default 20 attempts gives up after roughly 11 hours. The delay is stored in the
//! job's `run_at`; nothing sleeps in-process.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Exponential backoff with jitter. See the module docs for the formula.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Delay after the first failed attempt.
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// Growth per attempt.
    pub factor: f64,
    /// Upper bound before jitter.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Relative spread, 0.0..=1.0: 0.2 means ±20 %.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(2),
            factor: 2.0,
            max: Duration::from_secs(3600),
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The delay before the next attempt after attempt `attempt` (1-based) failed.
    pub fn delay(&self, attempt: i32) -> Duration {
        let unjittered = self.unjittered(attempt);
        if self.jitter <= 0.0 {
            return unjittered;
        }
        let spread = self.jitter.min(1.0);
        let scale = 1.0 + rand::rng().random_range(-spread..=spread);
        unjittered.mul_f64(scale.max(0.0))
    }

    /// The delay without jitter: `min(max, base · factor^(attempt − 1))`.
    pub fn unjittered(&self, attempt: i32) -> Duration {
        let exponent = (attempt.max(1) - 1).min(64);
        let secs = self.base.as_secs_f64() * self.factor.max(1.0).powi(exponent);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_then_caps() {
        let p = RetryPolicy::default();
        assert_eq!(p.unjittered(1), Duration::from_secs(2));
        assert_eq!(p.unjittered(2), Duration::from_secs(4));
        assert_eq!(p.unjittered(5), Duration::from_secs(32));
        assert_eq!(p.unjittered(13), Duration::from_secs(3600));
        assert_eq!(p.unjittered(10_000), Duration::from_secs(3600));
    }

    #[test]
    fn jitter_stays_in_bounds() {
        let p = RetryPolicy::default();
        for _ in 0..1000 {
            let d = p.delay(3).as_secs_f64();
            assert!((6.4..=9.6).contains(&d), "{d}");
        }
    }
}
