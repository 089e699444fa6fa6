//! Throttles shared by every worker on the store: per recipient domain
//! (`[email.throttles."<domain>"]`) and per transport (`rate_per_second`, `concurrency` on
//! `[email.transports.<name>]`).
//!
//! Both limits live in the store, so every process sending through it counts against the
//! same numbers, on every backend, with nothing but the store's own primitives:
//! - the rate is the store's token bucket ([`MetaStore::take_tokens`], atomic on each
//!   backend; the API's and webhooks' rate limits use it too), one bucket per domain or
//!   transport, one token per SMTP transaction;
//! - the concurrency is `concurrency` slots, records of the collection `email_slots`
//!   (`<scope>#<i>`), each taken by an atomic create ([`Expect::Absent`]) and given back by a
//!   delete of exactly that version. A slot holds a lease (a TTL): a worker that dies while
//!   holding one loses it when the lease ends, and it never blocks the domain for longer.
//!
//! A recipient whose domain or transport is at its limit is not tried in this attempt: it
//! stays pending, and when nothing else is left to retry the job is snoozed (it runs again
//! later without using an attempt), so a throttled message is delayed, never dropped.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use conveyor_worker::store::meta::{Expect, Put, RateLimit};
use conveyor_worker::{Error, Store};
use rand::Rng as _;
use serde::{Deserialize, Serialize};

use super::config::is_domain;

/// Collection of the concurrency slots.
pub const SLOTS: &str = "email_slots";

/// How long a throttled recipient waits before its job tries again, at least, when its
/// domain or transport has every concurrency slot taken (the wait is spread up to twice
/// this, so the waiters do not come back in the same tick).
pub const BUSY_WAIT: Duration = Duration::from_millis(100);

/// `[email.throttles."<domain>"]`: the limits of mail to one recipient domain.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Throttle {
    /// SMTP transactions per second, across every worker. Unset: no rate limit.
    pub rate_per_second: Option<f64>,
    /// How many transactions may start at once after a quiet spell (default 1: evenly
    /// spaced).
    pub burst: Option<f64>,
    /// Transactions in progress at once, across every worker. Unset: no limit.
    pub concurrency: Option<u32>,
}

impl Throttle {
    /// The keys a throttle has (the environment may set them:
    /// `CONVEYOR_EMAIL__THROTTLES__<DOMAIN>__<KEY>`).
    pub const FIELDS: [&'static str; 3] = ["rate_per_second", "burst", "concurrency"];

    fn check(&self, key: &str) -> Result<(), String> {
        if let Some(r) = self.rate_per_second
            && !(r.is_finite() && r > 0.0)
        {
            return Err(format!(
                "`{key}.rate_per_second` = {r}: give a positive number (5, or 0.5 for one every 2s)"
            ));
        }
        if let Some(b) = self.burst {
            if !(b.is_finite() && b >= 1.0) {
                return Err(format!("`{key}.burst` = {b}: give a number of at least 1"));
            }
            if self.rate_per_second.is_none() {
                return Err(format!("`{key}.burst` is given without `rate_per_second`"));
            }
        }
        if self.concurrency == Some(0) {
            return Err(format!(
                "`{key}.concurrency` must be at least 1 (remove it for no limit)"
            ));
        }
        Ok(())
    }

    fn rate(&self) -> Option<RateLimit> {
        self.rate_per_second.map(|per_second| RateLimit {
            per_second,
            burst: self.burst.unwrap_or(1.0),
        })
    }
}

/// Checks `[email.throttles]`.
pub(crate) fn validate(throttles: &BTreeMap<String, Throttle>) -> Result<(), String> {
    for (domain, t) in throttles {
        let key = format!("email.throttles.\"{domain}\"");
        if !is_domain(domain) || domain.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(format!(
                "`{key}`: name a recipient domain in lower case, such as [email.throttles.\"gmail.com\"]"
            ));
        }
        t.check(&key)?;
    }
    Ok(())
}

/// Checks a transport's `rate_per_second`, `burst` and `concurrency`.
pub(crate) fn validate_transport(name: &str, t: &Throttle) -> Result<(), String> {
    t.check(&format!("email.transports.{name}"))
}

/// One limit a transaction passes: a domain's or a transport's.
pub(crate) struct Scope<'a> {
    /// `domain:gmail.com` or `transport:bulk`.
    pub(crate) name: String,
    pub(crate) throttle: &'a Throttle,
}

/// The slots a transaction holds; given back by [`Held::release`].
#[derive(Default)]
pub(crate) struct Held {
    slots: Vec<(String, i64)>,
}

/// Why a transaction may not start now.
pub(crate) struct Wait {
    /// How long until it may.
    pub(crate) after: Duration,
    /// What the limit is, for the recipient's result.
    pub(crate) reason: String,
}

/// Takes, for one SMTP transaction, a concurrency slot and a token of each scope; on a
/// refusal everything taken is given back and the wait is returned. `lease` bounds how long
/// a slot can outlive a worker that died holding it.
pub(crate) async fn acquire(
    store: &dyn Store,
    scopes: &[Scope<'_>],
    lease: Duration,
    holder: &str,
) -> conveyor_worker::Result<Result<Held, Wait>> {
    let mut held = Held::default();
    // The slots first: a token is only spent by a transaction that then runs.
    for scope in scopes {
        let Some(n) = scope.throttle.concurrency else {
            continue;
        };
        match take_slot(store, &scope.name, n, lease, holder).await {
            Ok(Some(slot)) => held.slots.push(slot),
            Ok(None) => {
                held.release(store).await;
                let spread = BUSY_WAIT.mul_f64(rand::rng().random_range(0.0..1.0));
                return Ok(Err(Wait {
                    after: BUSY_WAIT + spread,
                    reason: format!(
                        "throttled: {} has {n} transaction(s) in progress, its concurrency",
                        scope.name
                    ),
                }));
            }
            Err(e) => {
                held.release(store).await;
                return Err(e);
            }
        }
    }
    for scope in scopes {
        let Some(limit) = scope.throttle.rate() else {
            continue;
        };
        let take = match store
            .take_tokens(&format!("email:{}", scope.name), limit, 1.0, Utc::now())
            .await
        {
            Ok(t) => t,
            Err(e) => {
                held.release(store).await;
                return Err(e);
            }
        };
        if !take.allowed {
            held.release(store).await;
            let wait = take.retry_after.max(Duration::from_millis(5));
            let spread = wait.mul_f64(rand::rng().random_range(0.0..0.5));
            return Ok(Err(Wait {
                after: wait + spread,
                reason: format!(
                    "throttled: {} is at its rate of {}/s",
                    scope.name, limit.per_second
                ),
            }));
        }
    }
    Ok(Ok(held))
}

/// One free slot of `scope`'s `n`, created atomically; `None` when all are taken.
async fn take_slot(
    store: &dyn Store,
    scope: &str,
    n: u32,
    lease: Duration,
    holder: &str,
) -> conveyor_worker::Result<Option<(String, i64)>> {
    let value = serde_json::json!({ "holder": holder });
    // Start at a random slot so concurrent takers spread over the free ones.
    let start = rand::rng().random_range(0..n);
    for i in 0..n {
        let key = format!("{scope}#{}", (start + i) % n);
        let put = Put {
            collection: SLOTS,
            key: &key,
            value: &value,
            expect: Expect::Absent,
            ttl: Some(lease),
        };
        match store.meta_put(put).await {
            Ok(record) => return Ok(Some((key, record.version))),
            Err(Error::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

impl Held {
    /// Gives the slots back (each only if it is still this holder's: a slot whose lease
    /// ended may be someone else's by now). A failure leaves the slot to its lease.
    pub(crate) async fn release(&mut self, store: &dyn Store) {
        for (key, version) in self.slots.drain(..) {
            if let Err(e) = store
                .meta_delete(SLOTS, &key, Expect::Version(version))
                .await
                && !matches!(e, Error::Conflict(_))
            {
                tracing::warn!(slot = %key, error = %e, "could not give back an email throttle slot; its lease will free it");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let mut m = BTreeMap::new();
        m.insert(
            "gmail.com".to_string(),
            Throttle {
                rate_per_second: Some(5.0),
                burst: None,
                concurrency: Some(2),
            },
        );
        assert!(validate(&m).is_ok());
        m.insert("Gmail.com".to_string(), Throttle::default());
        assert!(validate(&m).unwrap_err().contains("lower case"));
        m.remove("Gmail.com");
        m.get_mut("gmail.com").unwrap().concurrency = Some(0);
        assert!(validate(&m).unwrap_err().contains("concurrency"));
        m.get_mut("gmail.com").unwrap().concurrency = None;
        m.get_mut("gmail.com").unwrap().rate_per_second = Some(0.0);
        assert!(validate(&m).unwrap_err().contains("rate_per_second"));
        let t = Throttle {
            rate_per_second: None,
            burst: Some(3.0),
            concurrency: None,
        };
        assert!(
            validate_transport("bulk", &t)
                .unwrap_err()
                .contains("email.transports.bulk.burst")
        );
    }
}
