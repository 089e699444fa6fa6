//! Signing per the Standard Webhooks specification, and the matching verification for
//! receivers written in Rust.
//!
//! Every request carries three headers:
//! - `webhook-id`: the message id, the same on every retry and replay (receivers dedupe on it);
//! - `webhook-timestamp`: seconds since the Unix epoch when this attempt was signed;
//! - `webhook-signature`: space-separated `v1,<base64 HMAC-SHA256>` entries, one per valid
//!   secret, of `"{id}.{timestamp}.{body}"` keyed with the base64-decoded secret (the part
//!   after `whsec_`). During a secret rotation both secrets sign, so a receiver holding either
//!   one accepts.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// The prefix of every signing secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// What [`secret_key`] accepts: optionally [`SECRET_PREFIX`], then standard padded base64 of
/// at least one byte, its last symbol canonical (no stray bits).
pub const SECRET_PATTERN: &str = concat!(
    r"^(whsec_)?(?:[A-Za-z0-9+/]{4})*",
    r"(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=|[A-Za-z0-9+/]{4})$",
);

/// A signing secret in the OpenAPI document: a string matching [`SECRET_PATTERN`].
pub struct SecretSchema;

impl utoipa::PartialSchema for SecretSchema {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .pattern(Some(SECRET_PATTERN))
            .description(Some("`whsec_` and standard padded base64 of the key"))
            .into()
    }
}

impl utoipa::ToSchema for SecretSchema {}

/// Header names, as the specification spells them.
pub const HEADER_ID: &str = "webhook-id";
/// See [`HEADER_ID`].
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// See [`HEADER_ID`].
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// Why a signature or secret was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// The secret is not `whsec_` followed by base64.
    #[error(
        "the secret must be `whsec_` followed by base64 (as `conveyor webhooks endpoints create` prints it)"
    )]
    BadSecret,
    /// A required header is missing.
    #[error("the `{0}` header is missing")]
    MissingHeader(&'static str),
    /// The timestamp is not an integer.
    #[error("the `webhook-timestamp` header is not a number of seconds")]
    BadTimestamp,
    /// The timestamp is further from now than the tolerance (a replayed or delayed request).
    #[error("the timestamp is {0} s away from now, beyond the tolerance")]
    Stale(i64),
    /// No `v1` signature matched any of the secrets.
    #[error("no signature matches")]
    NoMatch,
}

/// A fresh signing secret: `whsec_` and 24 random bytes in base64.
pub fn generate_secret() -> String {
    let mut key = [0u8; 24];
    rand::rng().fill_bytes(&mut key);
    format!("{SECRET_PREFIX}{}", B64.encode(key))
}

/// The HMAC key inside a secret.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, SignatureError> {
    let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    let key = B64.decode(encoded).map_err(|_| SignatureError::BadSecret)?;
    if key.is_empty() {
        return Err(SignatureError::BadSecret);
    }
    Ok(key)
}

/// One `v1,<base64>` signature of `"{id}.{timestamp}.{body}"`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

/// The `webhook-signature` header value: one signature per key, space-separated.
pub fn signature_header(keys: &[Vec<u8>], id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|k| sign(k, id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Verifies a request a receiver got: the three headers (looked up case-insensitively by
/// `header`), the raw body, and the secret as the endpoint shows it (`whsec_…`).
/// `tolerance_secs` bounds how far `webhook-timestamp` may be from `now_secs` (5 minutes is
/// usual), which stops replays of captured requests.
///
/// ```
/// use conveyor_jobs::webhook::signature::{generate_secret, secret_key, signature_header, verify};
/// let secret = generate_secret();
/// let key = secret_key(&secret).unwrap();
/// let sig = signature_header(&[key], "msg_1", 1_700_000_000, b"{}");
/// let headers = [("webhook-id", "msg_1"), ("webhook-timestamp", "1700000000"), ("webhook-signature", sig.as_str())];
/// let get = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.to_string());
/// assert!(verify(&secret, get, b"{}", 1_700_000_010, 300).is_ok());
/// ```
pub fn verify(
    secret: &str,
    header: impl Fn(&str) -> Option<String>,
    body: &[u8],
    now_secs: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let key = secret_key(secret)?;
    let id = header(HEADER_ID).ok_or(SignatureError::MissingHeader(HEADER_ID))?;
    let ts = header(HEADER_TIMESTAMP).ok_or(SignatureError::MissingHeader(HEADER_TIMESTAMP))?;
    let sigs = header(HEADER_SIGNATURE).ok_or(SignatureError::MissingHeader(HEADER_SIGNATURE))?;
    let ts: i64 = ts
        .trim()
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    let skew = now_secs - ts;
    if skew.abs() > tolerance_secs {
        return Err(SignatureError::Stale(skew));
    }
    for candidate in sigs.split_whitespace() {
        let Some(encoded) = candidate.strip_prefix("v1,") else {
            continue;
        };
        let Ok(expected) = B64.decode(encoded) else {
            continue;
        };
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&key).expect("HMAC accepts keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(ts.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        // Constant-time comparison.
        if mac.verify_slice(&expected).is_ok() {
            return Ok(());
        }
    }
    Err(SignatureError::NoMatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(id: &str, ts: i64, sig: &str) -> impl Fn(&str) -> Option<String> {
        let (id, sig) = (id.to_string(), sig.to_string());
        move |name: &str| match name {
            HEADER_ID => Some(id.clone()),
            HEADER_TIMESTAMP => Some(ts.to_string()),
            HEADER_SIGNATURE => Some(sig.clone()),
            _ => None,
        }
    }

    #[test]
    fn known_vector() {
        // The example from the Standard Webhooks specification.
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn round_trip_rotation_and_refusals() {
        let old = generate_secret();
        let new = generate_secret();
        assert!(old.starts_with("whsec_") && old != new);
        let keys = vec![secret_key(&new).unwrap(), secret_key(&old).unwrap()];
        let sig = signature_header(&keys, "msg_1", 100, b"body");
        assert!(verify(&old, headers("msg_1", 100, &sig), b"body", 100, 300).is_ok());
        assert!(verify(&new, headers("msg_1", 100, &sig), b"body", 100, 300).is_ok());
        let other = generate_secret();
        assert_eq!(
            verify(&other, headers("msg_1", 100, &sig), b"body", 100, 300),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(
            verify(&new, headers("msg_1", 100, &sig), b"bodz", 100, 300),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(
            verify(&new, headers("msg_1", 100, &sig), b"body", 1000, 300),
            Err(SignatureError::Stale(900))
        );
        assert_eq!(secret_key("whsec_!!"), Err(SignatureError::BadSecret));
    }
}
