//! One-click unsubscribe (RFC 8058) for the messages of a list.
//!
//! When `email.public_url` is set, every recipient of a message that names a `list` gets a
//! copy of its own carrying
//!
//! ```text
//! List-Unsubscribe: <{public_url}/v1/unsubscribe/{token}>
//! List-Unsubscribe-Post: List-Unsubscribe=One-Click
//! ```
//!
//! both covered by the DKIM signature when the message is signed (RFC 8058 §3.1). The token
//! binds the recipient's address and the list, signed with the secrets keys
//! ([`Keyring::sign`], HMAC-SHA256): `<base64url(address "\n" list)>.<key id>.<base64url(tag)>`.
//! It names its key id, so links sent before a key rotation keep working while the old key
//! is still configured. `POST /v1/unsubscribe/{token}` (no API key: the recipient's mail
//! client calls it) checks it ([`read_token`]) and suppresses the address for that list only
//! (`conveyor_admin::Admin::unsubscribe`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use conveyor_worker::keyring::{KeyError, Keyring};

/// What the tags are made for (a tag made for another purpose never verifies here).
pub const PURPOSE: &str = "email.unsubscribe";
/// The path under `email.public_url` that the link points at, followed by the token.
pub const PATH: &str = "/v1/unsubscribe/";
/// The value of `List-Unsubscribe-Post` (RFC 8058 §3.1).
pub const ONE_CLICK: &str = "List-Unsubscribe=One-Click";
/// Longest token accepted (an address of 254 bytes and a list of 64, encoded, and the tag).
const MAX_TOKEN: usize = 512;

/// What a valid token asks: stop the messages of `list` to `address`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsubscribe {
    /// The recipient's address, as it was sent to.
    pub address: String,
    /// The list.
    pub list: String,
}

/// Why a token is refused. The messages are shown to whoever holds the link (no API key is
/// needed), so they name no key id and nothing of the configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not in the token's shape (cut short when copied, or made up).
    #[error(
        "this is not an unsubscribe link's token (it was cut short or altered); open the link from the message again"
    )]
    Malformed,
    /// The tag does not match: altered, or not made by this deployment.
    #[error(
        "this unsubscribe link was altered or was not made by this server (its signature does not match)"
    )]
    Forged,
    /// Signed with a key that is no longer configured (or none is).
    #[error(
        "this unsubscribe link was signed with a key this server no longer has; unsubscribe with a link from a newer message, or ask the sender"
    )]
    UnknownKey,
}

fn data(address: &str, list: &str) -> Vec<u8> {
    format!("{address}\n{list}").into_bytes()
}

/// The token for `address` and `list`, signed with the current key of `keys`.
pub fn token(keys: &Keyring, address: &str, list: &str) -> Result<String, KeyError> {
    let data = data(address, list);
    let (key_id, tag) = keys.sign(PURPOSE, &data)?;
    Ok(format!(
        "{}.{key_id}.{}",
        B64URL.encode(&data),
        B64URL.encode(tag)
    ))
}

/// The link for `token` under `public_url` (without a trailing `/`).
pub fn url(public_url: &str, token: &str) -> String {
    format!("{}{PATH}{token}", public_url.trim_end_matches('/'))
}

/// What `token` asks, once its signature is checked against `keys`.
pub fn read_token(keys: &Keyring, token: &str) -> Result<Unsubscribe, TokenError> {
    if token.len() > MAX_TOKEN {
        return Err(TokenError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(payload), Some(key_id), Some(tag), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let payload = B64URL.decode(payload).map_err(|_| TokenError::Malformed)?;
    let tag = B64URL.decode(tag).map_err(|_| TokenError::Malformed)?;
    match keys.verify(key_id, PURPOSE, &payload, &tag) {
        Ok(true) => {}
        Ok(false) => return Err(TokenError::Forged),
        Err(_) => return Err(TokenError::UnknownKey),
    }
    let text = String::from_utf8(payload).map_err(|_| TokenError::Malformed)?;
    let (address, list) = text.split_once('\n').ok_or(TokenError::Malformed)?;
    Ok(Unsubscribe {
        address: address.to_string(),
        list: list.to_string(),
    })
}

/// Checks `email.public_url`: an `http`/`https` URL without a query or fragment.
pub(crate) fn check_public_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| {
        format!(
            "`email.public_url` = \"{url}\" is not a URL ({e}); give the API's public base URL, e.g. https://conveyor.example.com"
        )
    })?;
    if !matches!(parsed.scheme(), "http" | "https")
        || parsed.host_str().is_none()
        || parsed.query().is_some()
        || parsed.fragment().is_some()
    {
        return Err(format!(
            "`email.public_url` = \"{url}\": give the API's public base URL (http or https, no query), e.g. https://conveyor.example.com"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_worker::keyring::Key;

    #[test]
    fn a_token_reads_back_only_unaltered_and_with_its_key() {
        let key = Key::generate();
        let keys = Keyring::new([key.clone()]);
        let t = token(&keys, "Ada@example.org", "newsletter").unwrap();
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "{t}: safe in a URL path"
        );
        assert_eq!(
            read_token(&keys, &t).unwrap(),
            Unsubscribe {
                address: "Ada@example.org".into(),
                list: "newsletter".into()
            }
        );
        // Another address or list under the same tag.
        let (_, rest) = t.split_once('.').unwrap();
        let other = format!(
            "{}.{rest}",
            B64URL.encode(data("bob@example.org", "newsletter"))
        );
        assert_eq!(read_token(&keys, &other), Err(TokenError::Forged));
        let other = format!(
            "{}.{rest}",
            B64URL.encode(data("Ada@example.org", "offers"))
        );
        assert_eq!(read_token(&keys, &other), Err(TokenError::Forged));
        assert_eq!(read_token(&keys, "abc"), Err(TokenError::Malformed));
        assert_eq!(
            read_token(&keys, &t[..t.len() - 3]),
            Err(TokenError::Forged)
        );
        assert_eq!(
            read_token(&Keyring::new([Key::generate()]), &t),
            Err(TokenError::UnknownKey)
        );
        // Rotation: the old key kept after the new one still reads old links.
        let rotated = Keyring::new([Key::generate(), key]);
        assert!(read_token(&rotated, &t).is_ok());
        assert_eq!(
            url("https://c.example.com/", &t),
            format!("https://c.example.com/v1/unsubscribe/{t}")
        );
    }

    #[test]
    fn the_public_url_is_a_base_url() {
        assert!(check_public_url("https://conveyor.example.com").is_ok());
        assert!(check_public_url("http://127.0.0.1:8080/base/").is_ok());
        assert!(check_public_url("conveyor.example.com").is_err());
        assert!(check_public_url("ftp://x.example.com").is_err());
        assert!(check_public_url("https://x.example.com/?a=b").is_err());
    }
}
