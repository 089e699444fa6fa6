//! DKIM signing (RFC 6376) of `email.send` messages: `[email.dkim.<name>]` in the config.
//!
//! A key signs the messages whose `From` domain is its `domain` or a subdomain of it (the
//! most specific key wins; of keys with the same domain, the entry named after it), or every message of a transport that names it (`dkim = "<name>"`
//! on the transport). The signature is lettre's (`rsa-sha256` or `ed25519-sha256`,
//! relaxed/relaxed canonicalization) and is made on each attempt after the message, its
//! `Message-ID` included, is built from the job's args: a retry carries the same signed
//! headers and body, only the signature's timestamp (`t=`) differs.
//!
//! Keys are PEM: PKCS#1 (`BEGIN RSA PRIVATE KEY`) or PKCS#8 (`BEGIN PRIVATE KEY`, RSA or
//! Ed25519, as `openssl genpkey` writes them). They come from the config (in clear, or sealed
//! with the secrets keys: `conveyor secrets seal --for email.dkim.<name>`), an environment
//! variable or a file, and are read once, when the service is built: a key that does not
//! parse stops the process at start with the key named.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use conveyor_worker::keyring::{Keyring, Sealed};
use lettre::message::dkim::{
    DkimCanonicalization, DkimCanonicalizationType, DkimConfig, DkimSigningAlgorithm,
    DkimSigningKey,
};
use lettre::message::header::HeaderName;
use rsa::RsaPrivateKey;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, PrivateKeyInfo, SecretDocument};
use serde::{Deserialize, Serialize};

use super::EmailError;
use super::config::is_domain;
use crate::webhook::model::REDACTED;

/// The headers signed, when the message has them (a header the message lacks is signed as
/// absent, so it cannot be added on the way). Not `Content-Type`: lettre writes it with the
/// body, after the signature is made; the body itself is covered by the body hash.
const SIGNED_HEADERS: [&str; 8] = [
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "MIME-Version",
];

/// Signed besides [`SIGNED_HEADERS`] in a message that carries a one-click unsubscribe link:
/// RFC 8058 §3.1 requires the signature to cover both. Only then, so that a message without
/// them is signed as before.
const LIST_HEADERS: [&str; 2] = ["List-Unsubscribe", "List-Unsubscribe-Post"];

/// `[email.dkim.<name>]`: one signing key.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimKey {
    /// The selector: the key's public half is published at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// The signing domain (`d=`). Unset: the entry's name.
    #[serde(default)]
    pub domain: Option<String>,
    /// The private key (PEM), in clear or sealed with the secrets keys (`conveyor secrets
    /// seal --for email.dkim.<name>`). At most one of `private_key`, `private_key_env`,
    /// `private_key_file`.
    #[serde(default)]
    pub private_key: Option<String>,
    /// The environment variable holding the private key (PEM).
    #[serde(default)]
    pub private_key_env: Option<String>,
    /// A file holding the private key (PEM).
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
}

impl DkimKey {
    /// The keys an entry has (the environment may set them:
    /// `CONVEYOR_EMAIL__DKIM__<NAME>__<KEY>`).
    pub const FIELDS: [&'static str; 5] = [
        "selector",
        "domain",
        "private_key",
        "private_key_env",
        "private_key_file",
    ];

    /// The signing domain.
    pub fn signing_domain<'a>(&'a self, name: &'a str) -> &'a str {
        self.domain.as_deref().unwrap_or(name)
    }
}

/// Never shows the key.
impl std::fmt::Debug for DkimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkimKey")
            .field("selector", &self.selector)
            .field("domain", &self.domain)
            .field("private_key", &self.private_key.as_ref().map(|_| REDACTED))
            .field("private_key_env", &self.private_key_env)
            .field("private_key_file", &self.private_key_file)
            .finish()
    }
}

/// The record a sealed private key is bound to (`conveyor secrets seal --for <record>`).
pub fn key_context(name: &str) -> String {
    crate::http_target::secret_context(&format!("email.dkim.{name}.private_key"))
}

/// Checks `[email.dkim]` as far as can be done without reading files (see
/// [`super::EmailConfig::validate`]).
pub(crate) fn validate(keys: &BTreeMap<String, DkimKey>) -> Result<(), String> {
    for (name, k) in keys {
        let key = format!("email.dkim.{name}");
        let domain = k.signing_domain(name);
        if !is_domain(domain) {
            return Err(format!(
                "`{key}`: the signing domain \"{domain}\" is not a domain name; name the entry after the domain (`[email.dkim.\"example.com\"]`) or set `domain`"
            ));
        }
        if !is_domain(&k.selector) {
            return Err(format!(
                "`{key}.selector` = \"{}\": give the DNS label the public key is published under (`<selector>._domainkey.{domain}`)",
                k.selector
            ));
        }
        let sources = [
            k.private_key.is_some(),
            k.private_key_env.is_some(),
            k.private_key_file.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        if sources != 1 {
            return Err(format!(
                "`{key}`: give the private key exactly one way: private_key, private_key_env or private_key_file"
            ));
        }
    }
    Ok(())
}

/// One entry's signer: for a message without, and for one with, the unsubscribe headers.
struct Signer {
    plain: DkimConfig,
    listed: DkimConfig,
}

/// The signers, by entry name, ready to sign.
#[derive(Default)]
pub(crate) struct Signers {
    by_name: BTreeMap<String, Arc<Signer>>,
    /// `(domain, name)`, the longest domains first.
    by_domain: Vec<(String, String)>,
}

impl Signers {
    /// Reads and parses every key of `keys`; a key that cannot be read or parsed is an error
    /// naming its config key (never showing the key).
    pub(crate) fn open(
        keys: &BTreeMap<String, DkimKey>,
        secrets: &Keyring,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, EmailError> {
        let mut signers = Signers::default();
        for (name, k) in keys {
            let (pem, source) = read_key(name, k, secrets, env)?;
            let signing_key = parse_key(&pem).map_err(|e| {
                EmailError::Config(format!(
                    "`email.dkim.{name}.{source}`: {e}; give a PEM private key: RSA (`openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048`) or Ed25519 (`openssl genpkey -algorithm ed25519`)"
                ))
            })?;
            let domain = k.signing_domain(name).to_ascii_lowercase();
            let config = |headers: &[&'static str], key| {
                DkimConfig::new(
                    k.selector.clone(),
                    domain.clone(),
                    key,
                    headers
                        .iter()
                        .map(|h| HeaderName::new_from_ascii_str(h))
                        .collect(),
                    DkimCanonicalization {
                        header: DkimCanonicalizationType::Relaxed,
                        body: DkimCanonicalizationType::Relaxed,
                    },
                )
            };
            // The key does not clone: parsed twice (once per header list), read once.
            let second_key = parse_key(&pem)
                .map_err(|e| EmailError::Config(format!("`email.dkim.{name}.{source}`: {e}")))?;
            let mut listed_headers = SIGNED_HEADERS.to_vec();
            listed_headers.extend(LIST_HEADERS);
            let signer = Signer {
                plain: config(&SIGNED_HEADERS, signing_key),
                listed: config(&listed_headers, second_key),
            };
            signers.by_name.insert(name.clone(), Arc::new(signer));
            signers.by_domain.push((domain, name.clone()));
        }
        // The longest domain first; of entries with one domain, the one named after it.
        signers.by_domain.sort_by(|a, b| {
            b.0.len()
                .cmp(&a.0.len())
                .then_with(|| a.0.cmp(&b.0))
                .then_with(|| (a.1 != a.0).cmp(&(b.1 != b.0)))
                .then_with(|| a.1.cmp(&b.1))
        });
        Ok(signers)
    }

    /// The signer for a message from `from_domain` sent through a transport whose `dkim`
    /// is `transport_key`; `listed`: the message carries the one-click unsubscribe headers.
    pub(crate) fn for_message(
        &self,
        transport_key: Option<&str>,
        from_domain: &str,
        listed: bool,
    ) -> Option<&DkimConfig> {
        let signer = if let Some(name) = transport_key {
            self.by_name.get(name)
        } else {
            let from = from_domain.to_ascii_lowercase();
            self.by_domain
                .iter()
                .find(|(d, _)| {
                    from == *d || (from.len() > d.len() && from.ends_with(&format!(".{d}")))
                })
                .and_then(|(_, name)| self.by_name.get(name))
        }?;
        Some(if listed {
            &signer.listed
        } else {
            &signer.plain
        })
    }
}

/// The PEM of entry `name`, and which key it came from.
fn read_key(
    name: &str,
    k: &DkimKey,
    secrets: &Keyring,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(String, &'static str), EmailError> {
    let key = format!("email.dkim.{name}");
    if let Some(value) = &k.private_key {
        let sealed = Sealed::from_stored(value.as_str());
        if sealed.key_id().is_some() {
            return secrets
                .open(&sealed, &key_context(name))
                .map(|pem| (pem, "private_key"))
                .map_err(|source| EmailError::Secret {
                    key: format!("{key}.private_key"),
                    source,
                });
        }
        return Ok((value.clone(), "private_key"));
    }
    if let Some(var) = &k.private_key_env {
        return match env(var) {
            Some(v) if !v.trim().is_empty() => Ok((v, "private_key_env")),
            _ => Err(EmailError::Config(format!(
                "`{key}.private_key_env`: the environment variable {var} is unset or empty"
            ))),
        };
    }
    if let Some(path) = &k.private_key_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            EmailError::Config(format!(
                "`{key}.private_key_file`: cannot read {}: {e}",
                path.display()
            ))
        })?;
        return Ok((text, "private_key_file"));
    }
    Err(EmailError::Config(format!(
        "`{key}`: no private key (private_key, private_key_env or private_key_file)"
    )))
}

/// OID of rsaEncryption (PKCS#1).
const RSA_OID: &str = "1.2.840.113549.1.1.1";
/// OID of Ed25519 (RFC 8410).
const ED25519_OID: &str = "1.3.101.112";

/// A PEM private key as lettre's signing key.
fn parse_key(pem: &str) -> Result<DkimSigningKey, String> {
    let pem = pem.trim();
    if pem.contains("-----BEGIN RSA PRIVATE KEY-----") {
        return DkimSigningKey::new(pem, DkimSigningAlgorithm::Rsa)
            .map_err(|e| format!("not a valid PKCS#1 RSA private key ({e})"));
    }
    if !pem.contains("-----BEGIN PRIVATE KEY-----") {
        return Err(if pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
            "the private key is encrypted; give it unencrypted (seal it with `conveyor secrets seal` to keep it secret in the config)".into()
        } else if pem.contains("PUBLIC KEY") {
            "this is a public key, not the private key".into()
        } else {
            "not a PEM private key".into()
        });
    }
    let (_, doc) =
        SecretDocument::from_pem(pem).map_err(|e| format!("not a valid PEM private key ({e})"))?;
    let info = PrivateKeyInfo::try_from(doc.as_bytes())
        .map_err(|e| format!("not a valid PKCS#8 private key ({e})"))?;
    match info.algorithm.oid.to_string().as_str() {
        RSA_OID => {
            let key = RsaPrivateKey::from_pkcs8_der(doc.as_bytes())
                .map_err(|e| format!("not a valid RSA private key ({e})"))?;
            let pkcs1 = key
                .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
                .map_err(|e| format!("cannot re-encode the RSA key ({e})"))?;
            DkimSigningKey::new(&pkcs1, DkimSigningAlgorithm::Rsa)
                .map_err(|e| format!("not a valid RSA private key ({e})"))
        }
        ED25519_OID => {
            // The private key is an OCTET STRING holding the 32-byte seed (RFC 8410 §7).
            let seed = match info.private_key {
                [0x04, 0x20, seed @ ..] if seed.len() == 32 => seed,
                _ => return Err("not a valid Ed25519 private key".into()),
            };
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD.encode(seed);
            DkimSigningKey::new(&b64, DkimSigningAlgorithm::Ed25519)
                .map_err(|e| format!("not a valid Ed25519 private key ({e})"))
        }
        other => Err(format!(
            "a key of algorithm {other}; DKIM signs with RSA or Ed25519"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_what_is_wrong() {
        assert!(parse_key("hello").unwrap_err().contains("not a PEM"));
        let public = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----";
        assert!(parse_key(public).unwrap_err().contains("public key"));
        let broken = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----";
        assert!(parse_key(broken).is_err());
        // An Ed25519 key as `openssl genpkey -algorithm ed25519` writes it.
        let ed = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIE0U7oyPoxP2KwmnpDq+qQlwCzuSFjuURMGUQMp2saRQ\n-----END PRIVATE KEY-----\n";
        assert!(parse_key(ed).is_ok());
    }

    #[test]
    fn the_most_specific_domain_signs() {
        let ed = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIE0U7oyPoxP2KwmnpDq+qQlwCzuSFjuURMGUQMp2saRQ\n-----END PRIVATE KEY-----\n";
        let entry = |selector: &str, domain: Option<&str>| DkimKey {
            selector: selector.into(),
            domain: domain.map(str::to_string),
            private_key: Some(ed.into()),
            private_key_env: None,
            private_key_file: None,
        };
        let mut keys = BTreeMap::new();
        keys.insert("example.com".to_string(), entry("a", None));
        keys.insert("mail".to_string(), entry("b", Some("mail.example.com")));
        validate(&keys).unwrap();
        let s = Signers::open(&keys, &Keyring::default(), &|_| None).unwrap();
        let name = |c: Option<&DkimConfig>| c.map(|c| format!("{c:?}"));
        assert!(
            name(s.for_message(None, "x.mail.example.com", false))
                .unwrap()
                .contains("\"b\"")
        );
        assert!(
            name(s.for_message(None, "Example.COM", false))
                .unwrap()
                .contains("\"a\"")
        );
        assert!(s.for_message(None, "notexample.com", false).is_none());
        assert!(
            name(s.for_message(Some("mail"), "other.org", true))
                .unwrap()
                .contains("\"b\"")
        );
        keys.insert("bad domain".to_string(), entry("a", None));
        assert!(
            validate(&keys)
                .unwrap_err()
                .contains("email.dkim.bad domain")
        );
    }
}
