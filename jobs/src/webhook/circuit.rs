//! The per-endpoint circuit breaker, shared by every worker through `webhook_circuits`.
//!
//! Closed: deliveries go out. After `webhooks.circuit_threshold` consecutive failures it
//! opens for `webhooks.circuit_cooldown`: deliveries that come up meanwhile are snoozed to
//! the end of the cool-down (their attempts are not used up). Then it is half-open: exactly
//! one delivery (the probe) goes out — whoever wins the versioned write that claims it — and
//! the others wait. A successful probe closes the circuit; a failed one reopens it.
//!
//! Successes write only when they change something (a failure count to reset), so a healthy
//! endpoint costs one read per delivery (cached for `webhooks.endpoint_cache`) and no writes.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use conveyor_worker::store::meta::{Expect, Put};
use rand::Rng;

use super::model::{CIRCUITS, Circuit};
use super::{Result, Webhooks};

/// Whether a delivery may go out now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Closed: send.
    Send,
    /// This delivery is the half-open probe.
    Probe,
    /// Open (or another probe is out): snooze this long.
    Wait(Duration),
}

/// What an attempt's result did to the circuit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureEffect {
    /// The circuit is open now.
    pub opened: bool,
    /// Failing without a success since then.
    pub failing_since: Option<DateTime<Utc>>,
}

const CAS_TRIES: usize = 8;

fn until(t: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (t - now).to_std().unwrap_or(Duration::ZERO)
}

impl Webhooks {
    /// The circuit of an endpoint (closed if never written).
    pub async fn circuit(&self, endpoint_id: &str) -> Result<Circuit> {
        Ok(match self.store.meta_get(CIRCUITS, endpoint_id).await? {
            Some(r) => r.decode()?,
            None => Circuit::default(),
        })
    }

    /// Decides whether a delivery to `endpoint_id` may go out at `now`.
    pub async fn admit(&self, endpoint_id: &str, now: DateTime<Utc>) -> Result<Admission> {
        let ttl = self.config.endpoint_cache;
        if !ttl.is_zero()
            && self
                .closed
                .lock()
                .expect("not poisoned")
                .get(endpoint_id)
                .is_some_and(|at| at.elapsed() < ttl)
        {
            return Ok(Admission::Send);
        }
        for _ in 0..CAS_TRIES {
            let record = self.store.meta_get(CIRCUITS, endpoint_id).await?;
            let (version, mut c) = match &record {
                Some(r) => (Some(r.version), r.decode::<Circuit>()?),
                None => (None, Circuit::default()),
            };
            let Some(open_until) = c.open_until else {
                if !ttl.is_zero() {
                    self.closed
                        .lock()
                        .expect("not poisoned")
                        .insert(endpoint_id.to_string(), Instant::now());
                }
                return Ok(Admission::Send);
            };
            if open_until > now {
                // Spread the snoozed deliveries over a second past the cool-down so the probe
                // is not followed by a stampede.
                let spread = Duration::from_millis(rand::rng().random_range(0..1000));
                return Ok(Admission::Wait(until(open_until, now) + spread));
            }
            if let Some(probe) = c.probe_until
                && probe > now
            {
                let spread = Duration::from_millis(rand::rng().random_range(100..1000));
                return Ok(Admission::Wait(
                    until(probe, now).min(Duration::from_secs(5)) + spread,
                ));
            }
            // Half-open and no probe out: claim the probe.
            c.probe_until = Some(conveyor_worker::store::after(
                now,
                self.config.timeout.saturating_mul(2),
            ));
            let value = serde_json::to_value(&c)?;
            let expect = version.map_or(Expect::Absent, Expect::Version);
            match self
                .store
                .meta_put(Put::new(CIRCUITS, endpoint_id, &value).expect(expect))
                .await
            {
                Ok(_) => return Ok(Admission::Probe),
                Err(conveyor_worker::Error::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Admission::Wait(Duration::from_secs(1)))
    }

    /// Records a success: closes the circuit if it was not cleanly closed.
    pub async fn record_success(&self, endpoint_id: &str, now: DateTime<Utc>) -> Result<()> {
        for _ in 0..CAS_TRIES {
            let Some(record) = self.store.meta_get(CIRCUITS, endpoint_id).await? else {
                return Ok(());
            };
            let c: Circuit = record.decode()?;
            if c.consecutive_failures == 0 && c.open_until.is_none() && c.probe_until.is_none() {
                return Ok(());
            }
            let closed = Circuit {
                last_success_at: Some(now),
                ..Circuit::default()
            };
            let value = serde_json::to_value(&closed)?;
            match self
                .store
                .meta_put(
                    Put::new(CIRCUITS, endpoint_id, &value).expect(Expect::Version(record.version)),
                )
                .await
            {
                Ok(_) => return Ok(()),
                Err(conveyor_worker::Error::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Records a failure: counts it, opens the circuit at the threshold (or reopens it after
    /// a failed probe).
    pub async fn record_failure(
        &self,
        endpoint_id: &str,
        now: DateTime<Utc>,
        was_probe: bool,
    ) -> Result<FailureEffect> {
        self.closed
            .lock()
            .expect("not poisoned")
            .remove(endpoint_id);
        for _ in 0..CAS_TRIES {
            let record = self.store.meta_get(CIRCUITS, endpoint_id).await?;
            let (expect, mut c) = match &record {
                Some(r) => (Expect::Version(r.version), r.decode::<Circuit>()?),
                None => (Expect::Absent, Circuit::default()),
            };
            c.consecutive_failures = c.consecutive_failures.saturating_add(1);
            c.failing_since.get_or_insert(now);
            let reopen = was_probe || c.open_until.is_some_and(|t| t <= now);
            if reopen
                || (c.open_until.is_none()
                    && c.consecutive_failures >= self.config.circuit_threshold)
            {
                c.open_until = Some(conveyor_worker::store::after(
                    now,
                    self.config.circuit_cooldown,
                ));
                c.probe_until = None;
            }
            let value = serde_json::to_value(&c)?;
            match self
                .store
                .meta_put(Put::new(CIRCUITS, endpoint_id, &value).expect(expect))
                .await
            {
                Ok(_) => {
                    return Ok(FailureEffect {
                        opened: c.open_until.is_some_and(|t| t > now),
                        failing_since: c.failing_since,
                    });
                }
                Err(conveyor_worker::Error::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        // Under heavy contention the count is best effort; the others' writes went through.
        Ok(FailureEffect {
            opened: false,
            failing_since: None,
        })
    }

    /// Closes the circuit (on re-enable).
    pub async fn reset_circuit(&self, endpoint_id: &str) -> Result<()> {
        self.closed
            .lock()
            .expect("not poisoned")
            .remove(endpoint_id);
        self.store
            .meta_delete(CIRCUITS, endpoint_id, Expect::Any)
            .await?;
        Ok(())
    }
}
