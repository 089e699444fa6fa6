//! The email suppression list: `/v1/email-suppressions` and `conveyor email suppressions …`
//! go through here. The rules are `conveyor_jobs::email::suppression`'s; this layer adds the
//! audit record of each change.

use conveyor_jobs::email::suppression::{self, NewSuppression, Suppression};
use serde_json::json;

use crate::{Actor, Admin, Error, Result};

impl Admin {
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
