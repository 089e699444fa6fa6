//! TLS to Redis: `rediss://` URLs, with the certificates named in the URL.
//!
//! - `rediss://host:6380/0` verifies the server against the Mozilla roots built into the
//!   binary (`webpki-roots`), like a managed Redis with a public certificate needs.
//! - `?tls_ca_file=/path/ca.pem` verifies it against that CA (PEM, one or more certificates)
//!   instead: a private CA or a self-signed server certificate.
//! - `?tls_cert_file=/path/client.pem&tls_key_file=/path/client.key` presents a client
//!   certificate (a server with `tls-auth-clients yes`).
//!
//! The parameters are taken off the URL before the redis crate sees it. The host name in the URL
//! must match the server certificate; there is no switch to skip verification.

use crate::error::{Error, Result};
use crate::store::redact_url;

/// URL parameters that name certificate files.
const CA_FILE: &str = "tls_ca_file";
const CERT_FILE: &str = "tls_cert_file";
const KEY_FILE: &str = "tls_key_file";

/// The redis client for `conn_url` (the store URL without `prefix`), with TLS set up from the
/// `tls_*` parameters. `url` is the URL as the user gave it, for messages.
pub(super) fn client(url: &str, conn_url: &str) -> Result<::redis::Client> {
    let bad = |reason: String| Error::BadUrl {
        url: redact_url(url),
        reason,
    };
    // The redis crate builds its rustls config with the process's default provider.
    crate::store::install_crypto_provider();
    let parsed = ::url::Url::parse(conn_url).map_err(|e| bad(e.to_string()))?;
    let mut ca = None;
    let mut cert = None;
    let mut key = None;
    let mut rest = Vec::new();
    for (name, value) in parsed.query_pairs() {
        match name.as_ref() {
            CA_FILE => ca = Some(value.into_owned()),
            CERT_FILE => cert = Some(value.into_owned()),
            KEY_FILE => key = Some(value.into_owned()),
            _ => rest.push((name.into_owned(), value.into_owned())),
        }
    }
    let open = |u: &str| ::redis::Client::open(u).map_err(|e| bad(e.to_string()));
    if ca.is_none() && cert.is_none() && key.is_none() {
        return open(conn_url);
    }
    let tls = matches!(parsed.scheme(), "rediss" | "valkeys");
    if !tls {
        return Err(bad(format!(
            "{CA_FILE}, {CERT_FILE} and {KEY_FILE} need TLS: write rediss:// instead of {}://",
            parsed.scheme()
        )));
    }
    let client_tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(::redis::ClientTlsConfig {
            client_cert: read(url, CERT_FILE, &cert)?,
            client_key: read(url, KEY_FILE, &key)?,
        }),
        (None, None) => None,
        _ => {
            return Err(bad(format!(
                "{CERT_FILE} and {KEY_FILE} go together: give both for a client certificate, or neither"
            )));
        }
    };
    let root_cert = ca.map(|ca| read(url, CA_FILE, &ca)).transpose()?;
    let mut stripped = parsed.clone();
    stripped.set_query(None);
    if !rest.is_empty() {
        stripped.query_pairs_mut().extend_pairs(rest);
    }
    ::redis::Client::build_with_tls(
        stripped.as_str(),
        ::redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(|e| bad(format!("the TLS certificates could not be used: {e}")))
}

/// Adds what to do to a refused server certificate, the failure an operator meets first.
pub(super) fn explain(e: ::redis::RedisError) -> Error {
    let text = e.to_string();
    if !text.contains("invalid peer certificate") {
        return e.into();
    }
    Error::Redis(::redis::RedisError::from((
        ::redis::ErrorKind::InvalidClientConfig,
        "the Redis server's TLS certificate was not accepted",
        format!(
            "{text}. Name the CA that signed it with {CA_FILE}=/path/ca.pem in the rediss:// URL \
             (without it, only public CAs are trusted); the URL's host must also be a name in \
             the certificate"
        ),
    )))
}

/// A certificate or key file's contents, or an error that names the parameter and the file.
fn read(url: &str, param: &str, path: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::BadUrl {
        url: redact_url(url),
        reason: format!("cannot read {param} `{path}`: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_urls_pass_through() {
        assert!(client("redis://h:6379/0", "redis://h:6379/0").is_ok());
        assert!(client("rediss://h:6380/0", "rediss://h:6380/0").is_ok());
    }

    #[test]
    fn certificate_parameters_are_checked() {
        let e = client("redis://h/0?tls_ca_file=/x", "redis://h/0?tls_ca_file=/x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rediss://"), "{e}");
        let e = client(
            "rediss://h/0?tls_cert_file=/x",
            "rediss://h/0?tls_cert_file=/x",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("go together"), "{e}");
        let e = client(
            "rediss://h/0?tls_ca_file=/nonexistent/ca.pem",
            "rediss://h/0?tls_ca_file=/nonexistent/ca.pem",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cannot read tls_ca_file `/nonexistent/ca.pem`"),
            "{e}"
        );
    }
}
