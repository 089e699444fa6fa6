//! Credentials kept in the store, encrypted ("sealed") so that a copy of the store or a
//! backup does not reveal them. Webhook signing secrets use it; any other credential the
//! platform keeps (SMTP passwords, object-storage keys, HTTP-target credentials) should too.
//!
//! - [`Key`]: 32 random bytes, written as base64 (`openssl rand -base64 32`). Its id
//!   ([`Key::id`]) is derived from it, so operators never name keys and an id cannot point at
//!   the wrong key.
//! - [`Keyring`]: the configured keys, the current one first. It seals with the current key
//!   and opens with whichever key a value names, so keys rotate without downtime: add a new
//!   key in front, re-encrypt, then drop the old one.
//! - [`Sealed`]: what the store keeps: `cv1:<key id>:<base64 of nonce ‖ ciphertext>`.
//!   XChaCha20-Poly1305 with a random 24-byte nonce per value; the associated data is the
//!   record the value belongs to (e.g. `webhook_endpoints/ep_…`), so a ciphertext copied to
//!   another record does not open. See docs/decisions/0005-secrets-at-rest.md.
//!
//! - [`Keyring::sign`] / [`Keyring::verify`]: HMAC-SHA256 tags with a key of the ring (a
//!   subkey derived from it for the purpose, so a tag never reuses the encryption key as
//!   is), for values handed out and checked later (an email's one-click unsubscribe link).
//!   A tag names its key id, so links made before a rotation keep verifying while the old
//!   key is still configured.
//!
//! No error, log line or `Debug` output carries a key or a plaintext.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// How to make a key, for error messages.
pub const KEY_HINT: &str = "a key is 32 random bytes in base64 (44 characters); make one with `conveyor secrets generate-key` or `openssl rand -base64 32`";

/// The tag every sealed value starts with (the format's version).
const TAG: &str = "cv1";
const NONCE_LEN: usize = 24;

/// Why a key could not be read, or a value could not be sealed or opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// A configured key is not 32 bytes of base64.
    #[error("not a secrets key ({reason}): {KEY_HINT}")]
    Malformed {
        /// What is wrong with it (never the key itself).
        reason: String,
    },
    /// A value must be sealed, or a sealed value opened, and no key is configured.
    #[error(
        "no secrets key is configured, and {what}; set `secrets.keys` (CONVEYOR_SECRETS__KEYS) or `secrets.key_file` (CONVEYOR_SECRETS__KEY_FILE): {KEY_HINT}"
    )]
    NoKey {
        /// What needs one ("the store holds secrets encrypted with key id 1a2b3c4d").
        what: String,
    },
    /// A sealed value names a key that is not configured.
    #[error(
        "the store's secrets were encrypted with key id {key_id}; the configured keys are {configured}; add the key whose id is {key_id} to `secrets.keys` or `secrets.key_file` (after it, if it is no longer the current one; `conveyor secrets status` shows the ids), or restore it from where it was backed up"
    )]
    UnknownKey {
        /// The id the value names.
        key_id: String,
        /// The configured ids, current first (`none` when there are none).
        configured: String,
    },
    /// The value does not open with its key: it was altered, or copied from another record.
    #[error(
        "a secret of {context} does not decrypt: it was altered in the store or copied from another record"
    )]
    Tampered {
        /// The record it belongs to.
        context: String,
    },
    /// The stored text is not a sealed value.
    #[error("a secret of {context} is not in the sealed format (`{TAG}:<key id>:<base64>`)")]
    Format {
        /// The record it belongs to.
        context: String,
    },
}

/// One encryption key.
#[derive(Clone)]
pub struct Key {
    id: String,
    bytes: Zeroizing<[u8; 32]>,
}

impl Key {
    /// A fresh random key.
    pub fn generate() -> Key {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(bytes.as_mut());
        Key::from_bytes(bytes)
    }

    fn from_bytes(bytes: Zeroizing<[u8; 32]>) -> Key {
        let digest = Sha256::new()
            .chain_update(b"conveyor secrets key id\0")
            .chain_update(bytes.as_ref())
            .finalize();
        let id = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        Key { id, bytes }
    }

    /// Reads a key written as base64 (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Key, KeyError> {
        let text = text.trim();
        let malformed = |reason: String| KeyError::Malformed { reason };
        if text.is_empty() {
            return Err(malformed("it is empty".into()));
        }
        let decoded = Zeroizing::new(B64.decode(text).map_err(|_| {
            malformed(format!(
                "{} characters that are not valid base64",
                text.chars().count()
            ))
        })?);
        let bytes: [u8; 32] = decoded.as_slice().try_into().map_err(|_| {
            malformed(format!(
                "it decodes to {} bytes, not 32",
                decoded.as_slice().len()
            ))
        })?;
        Ok(Key::from_bytes(Zeroizing::new(bytes)))
    }

    /// The key's id: 8 hex digits derived from it (a hash, which reveals nothing of the key).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key as base64, as [`Key::parse`] reads it: for writing a key file, nothing else.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(B64.encode(self.bytes.as_ref()))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&*self.bytes).into())
    }

    /// The HMAC of `data` for `purpose`, keyed by a subkey derived from this key (never the
    /// encryption key itself): HMAC(HMAC(key, "conveyor mac key\0" ‖ purpose), data).
    fn mac(&self, purpose: &str, data: &[u8]) -> Result<HmacSha256, KeyError> {
        let keyed = |key: &[u8]| {
            <HmacSha256 as Mac>::new_from_slice(key).map_err(|e| KeyError::Malformed {
                reason: format!("it cannot key an HMAC: {e}"),
            })
        };
        let mut derive = keyed(self.bytes.as_ref())?;
        derive.update(b"conveyor mac key\0");
        derive.update(purpose.as_bytes());
        let subkey: Zeroizing<[u8; 32]> = Zeroizing::new(derive.finalize().into_bytes().into());
        let mut mac = keyed(subkey.as_ref())?;
        mac.update(data);
        Ok(mac)
    }
}

type HmacSha256 = Hmac<Sha256>;

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.id)
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        // The id is a hash of the key; equal ids mean equal keys.
        self.id == other.id
    }
}

impl serde::Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Zeroizing::new(String::deserialize(d)?);
        Key::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A value as the store keeps it: `cv1:<key id>:<base64 of nonce ‖ ciphertext>`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Sealed(String);

impl Sealed {
    /// Wraps stored text (checked when opened).
    pub fn from_stored(text: impl Into<String>) -> Sealed {
        Sealed(text.into())
    }

    /// The stored text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id of the key it was sealed with (`None` if it is not in the sealed format).
    pub fn key_id(&self) -> Option<&str> {
        let mut parts = self.0.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(TAG), Some(id), Some(_)) => Some(id),
            _ => None,
        }
    }
}

/// The configured keys, the current (sealing) one first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl Keyring {
    /// A keyring of `keys`, the first the current one; a key listed twice counts once.
    pub fn new(keys: impl IntoIterator<Item = Key>) -> Keyring {
        let mut out: Vec<Key> = Vec::new();
        for key in keys {
            if !out.contains(&key) {
                out.push(key);
            }
        }
        Keyring { keys: out }
    }

    /// The key values are sealed with (`None`: no key is configured).
    pub fn current(&self) -> Option<&Key> {
        self.keys.first()
    }

    /// Whether a key is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The configured key ids, current first.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(Key::id).collect()
    }

    /// Whether `id` is configured.
    pub fn has(&self, id: &str) -> bool {
        self.keys.iter().any(|k| k.id == id)
    }

    /// Whether `sealed` is sealed with the current key.
    pub fn is_current(&self, sealed: &Sealed) -> bool {
        self.current()
            .is_some_and(|k| sealed.key_id() == Some(k.id()))
    }

    /// Encrypts `plaintext` with the current key, bound to `context` (the record it belongs
    /// to, e.g. `webhook_endpoints/ep_…`): it opens only with the same context.
    pub fn seal(&self, plaintext: &str, context: &str) -> Result<Sealed, KeyError> {
        let key = self.current().ok_or_else(|| KeyError::NoKey {
            what: "a secret must be written encrypted".into(),
        })?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let aad = associated_data(key.id(), context);
        let ciphertext = key
            .cipher()
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| KeyError::Tampered {
                context: context.into(),
            })?;
        let mut body = nonce.to_vec();
        body.extend_from_slice(&ciphertext);
        Ok(Sealed(format!("{TAG}:{}:{}", key.id(), B64.encode(body))))
    }

    /// Decrypts `sealed`, which must have been sealed for `context`.
    pub fn open(&self, sealed: &Sealed, context: &str) -> Result<String, KeyError> {
        let format = || KeyError::Format {
            context: context.into(),
        };
        let mut parts = sealed.0.splitn(3, ':');
        let (Some(TAG), Some(id), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format());
        };
        let key = self.keys.iter().find(|k| k.id == id).ok_or_else(|| {
            if self.is_empty() {
                KeyError::NoKey {
                    what: format!("the store holds secrets encrypted with key id {id}"),
                }
            } else {
                KeyError::UnknownKey {
                    key_id: id.into(),
                    configured: self.ids().join(", "),
                }
            }
        })?;
        let body = B64.decode(body).map_err(|_| format())?;
        if body.len() < NONCE_LEN {
            return Err(format());
        }
        let (nonce, ciphertext) = body.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| format())?;
        let aad = associated_data(id, context);
        let plain = Zeroizing::new(
            key.cipher()
                .decrypt(
                    &XNonce::from(nonce),
                    Payload {
                        msg: ciphertext,
                        aad: &aad,
                    },
                )
                .map_err(|_| KeyError::Tampered {
                    context: context.into(),
                })?,
        );
        String::from_utf8(plain.to_vec()).map_err(|_| KeyError::Tampered {
            context: context.into(),
        })
    }
}

impl Keyring {
    /// The id of the current key and the HMAC-SHA256 tag of `data` for `purpose` made with
    /// it (see the module docs).
    pub fn sign(&self, purpose: &str, data: &[u8]) -> Result<(String, Vec<u8>), KeyError> {
        let key = self.current().ok_or_else(|| KeyError::NoKey {
            what: format!("{purpose} values must be signed"),
        })?;
        let tag = key.mac(purpose, data)?.finalize().into_bytes().to_vec();
        Ok((key.id().to_string(), tag))
    }

    /// Whether `tag` is the tag of `data` for `purpose` made with key `key_id` (compared in
    /// constant time). A key id that is not configured is an error of its own
    /// ([`KeyError::UnknownKey`]): the value was signed before a key was dropped.
    pub fn verify(
        &self,
        key_id: &str,
        purpose: &str,
        data: &[u8],
        tag: &[u8],
    ) -> Result<bool, KeyError> {
        let key = self.keys.iter().find(|k| k.id == key_id).ok_or_else(|| {
            if self.is_empty() {
                KeyError::NoKey {
                    what: format!("{purpose} values must be checked"),
                }
            } else {
                KeyError::UnknownKey {
                    key_id: key_id.into(),
                    configured: self.ids().join(", "),
                }
            }
        })?;
        Ok(key.mac(purpose, data)?.verify_slice(tag).is_ok())
    }
}

/// What a ciphertext is bound to besides its key: the format, the key id and the record.
fn associated_data(key_id: &str, context: &str) -> Vec<u8> {
    format!("{TAG}:{key_id}:{context}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_verify_with_their_key_and_purpose_only() {
        let old = Key::generate();
        let ring = Keyring::new([old.clone()]);
        let (id, tag) = ring.sign("email.unsubscribe", b"ada@example.org").unwrap();
        assert_eq!(id, old.id());
        assert!(
            ring.verify(&id, "email.unsubscribe", b"ada@example.org", &tag)
                .unwrap()
        );
        assert!(
            !ring
                .verify(&id, "email.unsubscribe", b"bob@example.org", &tag)
                .unwrap()
        );
        assert!(!ring.verify(&id, "other", b"ada@example.org", &tag).unwrap());
        assert!(
            !ring
                .verify(&id, "email.unsubscribe", b"ada@example.org", &tag[1..])
                .unwrap()
        );
        // Rotated: a new current key, the old one still configured, still verifies.
        let rotated = Keyring::new([Key::generate(), old]);
        assert!(
            rotated
                .verify(&id, "email.unsubscribe", b"ada@example.org", &tag)
                .unwrap()
        );
        assert_ne!(rotated.sign("email.unsubscribe", b"x").unwrap().0, id);
        // Dropped: named as an unknown key.
        let dropped = Keyring::new([Key::generate()]);
        assert!(matches!(
            dropped.verify(&id, "email.unsubscribe", b"ada@example.org", &tag),
            Err(KeyError::UnknownKey { .. })
        ));
        assert!(matches!(
            Keyring::default().sign("email.unsubscribe", b"x"),
            Err(KeyError::NoKey { .. })
        ));
    }

    #[test]
    fn seals_and_opens_bound_to_the_record() {
        let ring = Keyring::new([Key::generate()]);
        let a = ring.seal("whsec_abc", "webhook_endpoints/ep_1").unwrap();
        let b = ring.seal("whsec_abc", "webhook_endpoints/ep_1").unwrap();
        assert_ne!(a, b, "a fresh nonce per value");
        assert!(!a.as_str().contains("whsec_abc"));
        assert_eq!(
            ring.open(&a, "webhook_endpoints/ep_1").unwrap(),
            "whsec_abc"
        );
        assert_eq!(
            ring.open(&a, "webhook_endpoints/ep_2"),
            Err(KeyError::Tampered {
                context: "webhook_endpoints/ep_2".into()
            })
        );
        // A flipped byte in the ciphertext.
        let mut text = a.as_str().to_string();
        let last = text.pop().unwrap();
        text.push(if last == 'A' { 'B' } else { 'A' });
        assert!(
            ring.open(&Sealed::from_stored(text), "webhook_endpoints/ep_1")
                .is_err()
        );
        assert!(matches!(
            ring.open(&Sealed::from_stored("whsec_abc"), "x"),
            Err(KeyError::Format { .. })
        ));
    }

    #[test]
    fn rotation_opens_with_any_key_and_names_missing_ones() {
        let (old, new) = (Key::generate(), Key::generate());
        let before = Keyring::new([old.clone()]);
        let sealed = before.seal("s", "c").unwrap();
        assert_eq!(sealed.key_id(), Some(old.id()));
        let both = Keyring::new([new.clone(), old.clone()]);
        assert_eq!(both.open(&sealed, "c").unwrap(), "s");
        assert!(!both.is_current(&sealed));
        assert!(both.is_current(&both.seal("s", "c").unwrap()));
        let err = Keyring::new([new.clone()]).open(&sealed, "c").unwrap_err();
        assert_eq!(
            err,
            KeyError::UnknownKey {
                key_id: old.id().into(),
                configured: new.id().into()
            }
        );
        let text = err.to_string();
        assert!(text.contains(old.id()) && text.contains(new.id()), "{text}");
        assert!(matches!(
            Keyring::default().open(&sealed, "c"),
            Err(KeyError::NoKey { .. })
        ));
        assert!(matches!(
            Keyring::default().seal("s", "c"),
            Err(KeyError::NoKey { .. })
        ));
    }

    #[test]
    fn keys_parse_from_base64_and_never_print() {
        let key = Key::generate();
        let text = key.to_base64();
        assert_eq!(text.len(), 44);
        let parsed = Key::parse(&format!(" {}\n", text.as_str())).unwrap();
        assert_eq!(parsed.id(), key.id());
        assert!(!format!("{parsed:?}").contains(text.as_str()));
        for bad in ["", "not base64!", "c2hvcnQ="] {
            let err = Key::parse(bad).unwrap_err().to_string();
            assert!(
                err.contains("openssl rand -base64 32") && err.contains("44 characters"),
                "{err}"
            );
        }
        assert!(
            Key::parse("c2hvcnQ=")
                .unwrap_err()
                .to_string()
                .contains("decodes to 5 bytes")
        );
    }
}
