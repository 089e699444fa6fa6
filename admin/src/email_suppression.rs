//! The email suppression list: `/v1/email-suppressions` and `conveyor email suppressions …`
//! go through here, and so does a recipient's one-click unsubscribe (`POST
//! /v1/unsubscribe/{token}`, [`Admin::unsubscribe`]). The rules are
//! `conveyor_jobs::email::suppression`'s and `…::unsubscribe`'s; this layer adds the audit
//! record of each change.

use conveyor_jobs::email::suppression::{self, NewSuppression, Reason, Suppression};
use conveyor_jobs::email::unsubscribe;
use serde_json::json;

use crate::{Actor, Admin, Error, Result};

/// What a one-click unsubscribe did.
#[derive(Clone, Debug, PartialEq)]
pub struct Unsubscribed {
    /// The entry that now stops the list's messages to the address.
    pub suppression: Suppression,
    /// The address was already suppressed for the list (a second click, or an operator's
    /// entry): nothing was changed.
    pub already: bool,
}

impl Admin {
    /// A recipient's one-click unsubscribe (RFC 8058): `token` (from the link in a list's
    /// message, see `conveyor_jobs::email::unsubscribe`) is checked against the secrets keys,
    /// and its address suppressed for its list only, reason `unsubscribe`. Idempotent: an
    /// address already suppressed for the list keeps its entry. Audited when it adds one. A
    /// token that is malformed, altered or signed with a key no longer configured is bad
    /// input (field `token`).
    pub async fn unsubscribe(&self, actor: &Actor, token: &str) -> Result<Unsubscribed> {
        let request = self.unsubscribe_request(token)?;
        let list = Some(request.list.as_str());
        if let Some(existing) =
            suppression::get(self.store.as_ref(), &request.address, list).await?
        {
            return Ok(Unsubscribed {
                suppression: existing,
                already: true,
            });
        }
        let s = suppression::add(
            self.store.as_ref(),
            NewSuppression {
                address: request.address,
                list: Some(request.list),
                reason: Reason::Unsubscribe,
                detail: Some("one-click unsubscribe (RFC 8058)".into()),
            },
        )
        .await?;
        self.audit(
            actor,
            "email.unsubscribe",
            json!({ "address": s.address, "list": s.list, "reason": s.reason }),
            1,
        )
        .await?;
        Ok(Unsubscribed {
            suppression: s,
            already: false,
        })
    }

    /// What unsubscribe link `token` asks (its address and list), once its signature is
    /// checked; changes nothing (the page a link opens, before its button is pressed).
    pub fn unsubscribe_request(&self, token: &str) -> Result<unsubscribe::Unsubscribe> {
        unsubscribe::read_token(self.webhooks.keyring(), token)
            .map_err(|e| conveyor_worker::Error::invalid("token", e.to_string()).into())
    }

    /// Adds (or replaces) a suppression. Audited.
    pub async fn add_email_suppression(
        &self,
        actor: &Actor,
        new: NewSuppression,
    ) -> Result<Suppression> {
        let s = suppression::add(self.store.as_ref(), new).await?;
        self.audit(
            actor,
            "email.suppression.add",
            json!({ "address": s.address, "list": s.list, "reason": s.reason }),
            1,
        )
        .await?;
        Ok(s)
    }

    /// One page of suppressions in address order (`prefix`: addresses starting with it;
    /// `after`: the `next` of the previous page).
    pub async fn email_suppressions(
        &self,
        prefix: Option<&str>,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<Suppression>> {
        Ok(suppression::list(self.store.as_ref(), prefix, after, limit).await?)
    }

    /// Removes the suppression of `address` for `list` (`None`: the one for every list).
    /// Audited; not found when there is none.
    pub async fn remove_email_suppression(
        &self,
        actor: &Actor,
        address: &str,
        list: Option<&str>,
    ) -> Result<()> {
        if !suppression::remove(self.store.as_ref(), address, list).await? {
            return Err(Error::NotFound(match list {
                Some(l) => format!("{address} is not suppressed for list `{l}`"),
                None => format!("{address} is not suppressed for every list"),
            }));
        }
        self.audit(
            actor,
            "email.suppression.remove",
            json!({ "address": address, "list": list }),
            1,
        )
        .await
    }
}
