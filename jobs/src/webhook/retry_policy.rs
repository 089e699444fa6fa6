//! When a failed delivery is tried again, and which failures are final.
//!
//! The default schedule (delay before each attempt, the first immediate):
//!
//! | attempt | 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 |
//! |---|---|---|---|---|---|---|---|---|
//! | waits | 0 | 5 s | 5 min | 30 min | 2 h | 5 h | 10 h | 10 h |
//!
//! — eight attempts over about 27.6 hours, each wait spread by ±10 % jitter so that a
//! receiver coming back up is not hit by every retry in the same second. An endpoint may set
//! its own schedule.
//!
//! Classification of one attempt ([`classify`]):
//! - 2xx: delivered.
//! - 3xx: a failure that is retried (redirects are not followed unless the endpoint allows it).
//! - 408, 409, 425, 429 and every 5xx, timeouts and connection errors: retried.
//! - 429 and 503 with `Retry-After`: retried after that delay, clamped to
//!   `webhooks.max_retry_after`.
//! - any other 4xx: retried until the attempt number reaches `permanent_4xx_after`
//!   (default 3), then final.

use std::time::Duration;

use rand::Rng;

/// The default schedule. See the module docs.
pub fn default_schedule() -> Vec<Duration> {
    [0, 5, 300, 1800, 7200, 18_000, 36_000, 36_000]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}

/// Relative spread of each wait.
pub const JITTER: f64 = 0.1;

/// The wait before attempt `next` (1-based) under `schedule`, jittered; `None` past its end.
pub fn delay_before(schedule: &[Duration], next: i32) -> Option<Duration> {
    let base = *schedule.get(usize::try_from(next - 1).ok()?)?;
    if base.is_zero() {
        return Some(base);
    }
    let scale = 1.0 + rand::rng().random_range(-JITTER..=JITTER);
    Some(base.mul_f64(scale))
}

/// What one attempt's result means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered.
    Delivered,
    /// Try again, after the receiver's `Retry-After` if it gave one.
    Retry {
        /// The receiver's requested delay, already clamped.
        after: Option<Duration>,
    },
    /// Stop: the receiver refuses this message for good.
    Permanent,
}

/// Classifies an HTTP status (see the module docs). `attempt` is the 1-based attempt that got
/// it; `retry_after` is the parsed `Retry-After` header.
pub fn classify(
    status: u16,
    attempt: i32,
    retry_after: Option<Duration>,
    permanent_4xx_after: i32,
    max_retry_after: Duration,
) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        429 | 503 => Verdict::Retry {
            after: retry_after.map(|d| d.min(max_retry_after)),
        },
        408 | 409 | 425 => Verdict::Retry { after: None },
        400..=499 if attempt >= permanent_4xx_after => Verdict::Permanent,
        _ => Verdict::Retry { after: None },
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_and_jitter() {
        let s = default_schedule();
        assert_eq!(delay_before(&s, 1), Some(Duration::ZERO));
        for _ in 0..100 {
            let d = delay_before(&s, 3).unwrap().as_secs_f64();
            assert!((270.0..=330.0).contains(&d), "{d}");
        }
        assert_eq!(delay_before(&s, 9), None);
        assert_eq!(delay_before(&s, 0), None);
    }

    #[test]
    fn statuses() {
        let max = Duration::from_secs(3600);
        assert_eq!(classify(204, 1, None, 3, max), Verdict::Delivered);
        assert_eq!(
            classify(500, 1, None, 3, max),
            Verdict::Retry { after: None }
        );
        assert_eq!(
            classify(301, 1, None, 3, max),
            Verdict::Retry { after: None }
        );
        assert_eq!(
            classify(429, 1, Some(Duration::from_secs(7)), 3, max),
            Verdict::Retry {
                after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            classify(503, 1, Some(Duration::from_secs(99_999)), 3, max),
            Verdict::Retry { after: Some(max) }
        );
        assert_eq!(
            classify(408, 9, None, 3, max),
            Verdict::Retry { after: None }
        );
        assert_eq!(
            classify(404, 2, None, 3, max),
            Verdict::Retry { after: None }
        );
        assert_eq!(classify(404, 3, None, 3, max), Verdict::Permanent);
    }

    #[test]
    fn retry_after_forms() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(parse_retry_after("12", now), Some(Duration::from_secs(12)));
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 2026 00:01:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
