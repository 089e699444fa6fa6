//! The suppression list: addresses no email is sent to, for every list or for one
//! list/topic.
//!
//! An entry is added by hand (`/v1/email-suppressions`, `conveyor email suppressions add`),
//! by a one-click unsubscribe, or by delivery itself when a server refuses a recipient with
//! an enhanced status of `5.1.x` (the mailbox does not exist: a hard bounce). Delivery checks
//! every recipient before sending: a suppressed one is skipped and its result says why
//! (`suppressed`); it is never sent.
//!
//! Each entry is one record of the store's `email_suppressions` collection under
//! `<address, lowercase>/<list, or * for every list>`, so a recipient is checked with one or
//! two reads by key on every backend.

use chrono::{DateTime, Utc};
use conveyor_worker::store::meta::{MetaQuery, Put};
use conveyor_worker::{Error, Store};
use serde::{Deserialize, Serialize};

/// The collection of suppressions.
pub const SUPPRESSIONS: &str = "email_suppressions";
/// The key part of an entry that covers every list.
const EVERY_LIST: &str = "*";
/// Longest list name.
pub const MAX_LIST: usize = 64;

/// Why an address is suppressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A server refused the address as nonexistent (`5.1.x`).
    HardBounce,
    /// Added by an operator.
    Manual,
    /// The recipient unsubscribed (one-click, RFC 8058).
    Unsubscribe,
    /// The recipient complained (marked a message as spam).
    Complaint,
}

impl Reason {
    /// As written in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::HardBounce => "hard_bounce",
            Reason::Manual => "manual",
            Reason::Unsubscribe => "unsubscribe",
            Reason::Complaint => "complaint",
        }
    }
}

/// An entry to add.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSuppression {
    /// The address (`ada@example.org`).
    pub address: String,
    /// Only for messages of this list/topic; absent: every message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<String>,
    /// Why (default `manual`).
    #[serde(default = "manual")]
    pub reason: Reason,
    /// A note (the server's reply of a hard bounce).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

fn manual() -> Reason {
    Reason::Manual
}

/// One entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Suppression {
    /// The address, lowercase.
    pub address: String,
    /// The list/topic it covers; absent: every message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<String>,
    /// Why.
    pub reason: Reason,
    /// A note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// When it was added.
    pub created_at: DateTime<Utc>,
}

impl Suppression {
    /// The reason a skipped recipient's result records.
    pub fn describe(&self) -> String {
        let scope = match &self.list {
            Some(l) => format!(" for list `{l}`"),
            None => String::new(),
        };
        let detail = self
            .detail
            .as_deref()
            .map(|d| format!(": {d}"))
            .unwrap_or_default();
        format!(
            "suppressed{scope} ({} since {}){detail}; not sent",
            self.reason.as_str(),
            self.created_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )
    }
}

/// Checks a list/topic name.
pub fn check_list(list: &str) -> Result<(), String> {
    let ok = !list.is_empty()
        && list.len() <= MAX_LIST
        && list
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{list}` must be 1 to {MAX_LIST} letters, digits, `_`, `-` or `.` (e.g. `newsletter`)"
        ))
    }
}

/// The address as entries are keyed: parsed, lowercase.
fn normalize(address: &str) -> Result<String, String> {
    let a: lettre::Address = address
        .trim()
        .parse()
        .map_err(|e| format!("`{address}` is not an email address ({e})"))?;
    Ok(a.to_string().to_lowercase())
}

fn key(address: &str, list: Option<&str>) -> String {
    format!("{address}/{}", list.unwrap_or(EVERY_LIST))
}

/// Adds (or replaces) an entry. `Err` is bad input naming `address` or `list`.
pub async fn add(store: &dyn Store, new: NewSuppression) -> conveyor_worker::Result<Suppression> {
    let address = normalize(&new.address).map_err(|m| Error::invalid("address", m))?;
    if let Some(l) = &new.list {
        check_list(l).map_err(|m| Error::invalid("list", m))?;
    }
    let s = Suppression {
        address,
        list: new.list,
        reason: new.reason,
        detail: new.detail.map(|d| d.chars().take(500).collect()),
        created_at: Utc::now(),
    };
    let value = serde_json::to_value(&s)?;
    let k = key(&s.address, s.list.as_deref());
    store.meta_put(Put::new(SUPPRESSIONS, &k, &value)).await?;
    Ok(s)
}

/// The entry that stops a message of `list` (or of no list) to `address`: one for every
/// list first, else one for `list`.
pub async fn find(
    store: &dyn Store,
    address: &str,
    list: Option<&str>,
) -> conveyor_worker::Result<Option<Suppression>> {
    let Ok(address) = normalize(address) else {
        return Ok(None);
    };
    if let Some(r) = store.meta_get(SUPPRESSIONS, &key(&address, None)).await? {
        return Ok(Some(r.decode()?));
    }
    if let Some(l) = list
        && let Some(r) = store
            .meta_get(SUPPRESSIONS, &key(&address, Some(l)))
            .await?
    {
        return Ok(Some(r.decode()?));
    }
    Ok(None)
}

/// The entry for exactly `address` and `list` (`None`: the one for every list), if any.
pub async fn get(
    store: &dyn Store,
    address: &str,
    list: Option<&str>,
) -> conveyor_worker::Result<Option<Suppression>> {
    let address = normalize(address).map_err(|m| Error::invalid("address", m))?;
    match store.meta_get(SUPPRESSIONS, &key(&address, list)).await? {
        Some(r) => Ok(Some(r.decode()?)),
        None => Ok(None),
    }
}

/// One page of entries in address order, after `after` (an entry's key: `address/list`),
/// only addresses starting with `prefix` if given.
pub async fn list(
    store: &dyn Store,
    prefix: Option<&str>,
    after: Option<String>,
    limit: u32,
) -> conveyor_worker::Result<Vec<Suppression>> {
    let page = store
        .meta_list(
            SUPPRESSIONS,
            &MetaQuery {
                prefix: prefix.map(str::to_lowercase),
                after,
                limit,
                descending: false,
            },
        )
        .await?;
    page.iter().map(|r| r.decode()).collect()
}

/// Removes the entry for `address` and `list` (`None`: the one for every list); `false` if
/// there was none.
pub async fn remove(
    store: &dyn Store,
    address: &str,
    list: Option<&str>,
) -> conveyor_worker::Result<bool> {
    let address = normalize(address).map_err(|m| Error::invalid("address", m))?;
    store
        .meta_delete(
            SUPPRESSIONS,
            &key(&address, list),
            conveyor_worker::store::meta::Expect::Any,
        )
        .await
}

/// Whether a server's reply is a hard bounce: an enhanced status `5.1.x` (bad destination
/// mailbox or address, RFC 3463), e.g. `550 5.1.1 No such user`.
pub fn is_hard_bounce(reply: &str) -> bool {
    reply.split(|c: char| c.is_whitespace() || c == ':' || c == '(').any(|word| {
        let mut parts = word.split('.');
        matches!(
            (parts.next(), parts.next(), parts.next(), parts.next()),
            (Some("5"), Some("1"), Some(n), None) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_bounces_are_5_1_x() {
        assert!(is_hard_bounce(
            "permanent error (550): 5.1.1 No such user here"
        ));
        assert!(is_hard_bounce("550 5.1.10 Recipient address rejected"));
        assert!(!is_hard_bounce("554 5.7.1 Message rejected as spam"));
        assert!(!is_hard_bounce("450 4.1.1 try later"));
        assert!(!is_hard_bounce("550 mailbox unavailable 5.1"));
    }
}
