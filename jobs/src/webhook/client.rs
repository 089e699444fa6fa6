//! The HTTP client: one pooled reqwest client per process, every connection passing the SSRF
//! guard, redirects refused unless an endpoint opts in (and then re-checked on every hop).

use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::guard::{Blocked, Guard, GuardedResolver};

/// How much of a response body the attempt log keeps.
pub const BODY_PREFIX: usize = 4096;

/// Most redirect hops followed when an endpoint allows redirects.
const MAX_REDIRECTS: usize = 5;

/// One request to send (webhook deliveries are POSTs of JSON).
#[derive(Debug)]
pub struct Request<'a> {
    /// The method.
    pub method: reqwest::Method,
    /// Where.
    pub url: &'a str,
    /// Every header (signature included).
    pub headers: &'a [(String, String)],
    /// The body.
    pub body: Vec<u8>,
    /// The body's `Content-Type` unless `headers` name one (`None`: no body, no type).
    pub content_type: Option<&'static str>,
    /// Whole-request limit (connect, send, first response bytes, body prefix).
    pub timeout: Duration,
    /// Follow 3xx (each hop guarded).
    pub follow_redirects: bool,
    /// Read a JSON answer (`Content-Type` `application/json` or `…+json`) up to this many
    /// bytes and one more into [`Response::json`] (one more: so the caller can tell an answer
    /// that is longer). 0: only the prefix is read.
    pub read_json: usize,
}

/// What came back.
#[derive(Clone, Debug, Default)]
pub struct Response {
    /// The HTTP status, if a response arrived.
    pub status: Option<u16>,
    /// `Retry-After`, raw.
    pub retry_after: Option<String>,
    /// The first [`BODY_PREFIX`] bytes of the body, lossily as UTF-8.
    pub body: String,
    /// Time from sending to the body prefix read (or the failure).
    pub latency: Duration,
    /// Transport failure: timeout, refused connection, guard refusal…
    pub error: Option<String>,
    /// The failure was the SSRF guard: permanent, retrying cannot help.
    pub blocked: bool,
    /// The failure was a timeout.
    pub timed_out: bool,
    /// A JSON answer's body, up to [`Request::read_json`] bytes and one more (only when
    /// asked for and the answer says it is JSON).
    pub json: Option<Vec<u8>>,
}

/// The process-wide sender.
#[derive(Clone, Debug)]
pub struct Client {
    guard: Guard,
    plain: reqwest::Client,
    following: reqwest::Client,
}

impl Client {
    /// Builds both clients (redirects off / guarded redirects).
    pub fn new(guard: Guard, connect_timeout: Duration) -> reqwest::Result<Self> {
        let base = || {
            reqwest::Client::builder()
                .dns_resolver(std::sync::Arc::new(GuardedResolver::new(guard.clone())))
                .no_proxy()
                .connect_timeout(connect_timeout)
                .pool_idle_timeout(Duration::from_secs(60))
                .user_agent(concat!("Conveyor-Webhooks/", env!("CARGO_PKG_VERSION")))
        };
        let plain = base().redirect(reqwest::redirect::Policy::none()).build()?;
        let hop_guard = guard.clone();
        let following = base()
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error("too many redirects");
                }
                // Names are checked by the resolver when the hop connects; literal IPs here.
                match hop_guard.check_url(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(blocked) => attempt.error(blocked),
                }
            }))
            .build()?;
        Ok(Self {
            guard,
            plain,
            following,
        })
    }

    /// Sends one request; never fails: every failure is described in the [`Response`].
    pub async fn send(&self, req: Request<'_>) -> Response {
        let started = Instant::now();
        let mut out = Response::default();
        let url = match reqwest::Url::parse(req.url) {
            Ok(u) => u,
            Err(e) => {
                out.error = Some(format!("bad URL `{}`: {e}", req.url));
                out.blocked = true;
                return out;
            }
        };
        if let Err(blocked) = self.guard.check_url(&url) {
            out.error = Some(blocked.to_string());
            out.blocked = true;
            return out;
        }
        let mut headers = HeaderMap::with_capacity(req.headers.len() + 1);
        if let Some(content_type) = req.content_type {
            headers.insert(
                reqwest::header::CONTENT_TYPE,
                HeaderValue::from_static(content_type),
            );
        }
        for (name, value) in req.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.insert(n, v);
            }
        }
        let client = if req.follow_redirects {
            &self.following
        } else {
            &self.plain
        };
        let sent = client
            .request(req.method, url)
            .headers(headers)
            .timeout(req.timeout)
            .body(req.body)
            .send()
            .await;
        match sent {
            Ok(mut resp) => {
                out.status = Some(resp.status().as_u16());
                out.retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let is_json = req.read_json > 0
                    && resp
                        .headers()
                        .get(reqwest::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.split(';').next())
                        .map(|t| t.trim().to_ascii_lowercase())
                        .is_some_and(|t| t == "application/json" || t.ends_with("+json"));
                let want = if is_json {
                    BODY_PREFIX.max(req.read_json.saturating_add(1))
                } else {
                    BODY_PREFIX
                };
                let mut body = Vec::new();
                // Only what is wanted is kept; the rest is not read (the connection is then
                // dropped rather than reused, which is fine for oversized answers).
                while body.len() < want {
                    match resp.chunk().await {
                        Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                        Ok(None) => break,
                        Err(e) => {
                            out.timed_out = e.is_timeout();
                            break;
                        }
                    }
                }
                if is_json && !out.timed_out {
                    out.json = Some(body[..body.len().min(want)].to_vec());
                }
                body.truncate(BODY_PREFIX);
                out.body = String::from_utf8_lossy(&body).into_owned();
            }
            Err(e) => {
                out.timed_out = e.is_timeout();
                out.blocked = find_blocked(&e).is_some();
                out.error = Some(match find_blocked(&e) {
                    Some(b) => b.to_string(),
                    None => error_chain(&e),
                });
            }
        }
        out.latency = started.elapsed();
        out
    }
}

fn find_blocked<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a Blocked> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if let Some(b) = e.downcast_ref::<Blocked>() {
            return Some(b);
        }
        next = e.source();
    }
    None
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut next = err.source();
    while let Some(e) = next {
        let s = e.to_string();
        if !parts.last().is_some_and(|p| p.contains(&s)) {
            parts.push(s);
        }
        next = e.source();
    }
    parts.join(": ")
}
