//! A real webhook receiver for tests: an axum server on `127.0.0.1:0` that records every
//! request it gets and answers as programmed — a status, `Retry-After`, a slow answer, a
//! redirect — per path, one scripted answer per request and then a default.
//! [`closing_server`] is a bare TCP listener that drops every connection without answering.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

/// How the receiver answers one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// This status with a short body.
    Status(u16),
    /// This status (429 or 503) with `Retry-After: secs`.
    RetryAfter(u16, u64),
    /// Wait, then answer 200.
    Slow(Duration),
    /// 307 to this URL.
    Redirect(String),
}

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    /// When it arrived.
    pub at: Instant,
    /// The path.
    pub path: String,
    /// Headers, names lower-case.
    pub headers: HashMap<String, String>,
    /// The raw body.
    pub body: Bytes,
}

impl Received {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

#[derive(Default)]
struct Inner {
    received: Vec<Received>,
    scripts: HashMap<String, VecDeque<Answer>>,
    defaults: HashMap<String, Answer>,
}

/// The running receiver. Dropping it stops the server.
pub struct Receiver {
    /// Where it listens.
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    _server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self._server.abort();
    }
}

impl Receiver {
    /// Starts a receiver on 127.0.0.1:0 that answers 200 until told otherwise.
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port on 127.0.0.1");
        let addr = listener.local_addr().expect("bound");
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            addr,
            inner,
            _server: server,
        }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The next requests to `path` get these answers, in order.
    pub fn script(&self, path: &str, answers: impl IntoIterator<Item = Answer>) {
        let mut inner = self.inner.lock().unwrap();
        inner
            .scripts
            .entry(path.to_string())
            .or_default()
            .extend(answers);
    }

    /// Requests to `path` beyond the script get this answer (default 200).
    pub fn default_answer(&self, path: &str, answer: Answer) {
        self.inner
            .lock()
            .unwrap()
            .defaults
            .insert(path.to_string(), answer);
    }

    /// Everything received on `path`, in arrival order.
    pub fn received(&self, path: &str) -> Vec<Received> {
        self.inner
            .lock()
            .unwrap()
            .received
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Everything received.
    pub fn all(&self) -> Vec<Received> {
        self.inner.lock().unwrap().received.clone()
    }
}

async fn handle(State(inner): State<Arc<Mutex<Inner>>>, req: Request) -> Response {
    let at = Instant::now();
    let path = req.uri().path().to_string();
    let headers: HashMap<String, String> = header_map(req.headers());
    let body = axum::body::to_bytes(req.into_body(), 16 << 20)
        .await
        .unwrap_or_default();
    let answer = {
        let mut inner = inner.lock().unwrap();
        inner.received.push(Received {
            at,
            path: path.clone(),
            headers,
            body,
        });
        let scripted = inner.scripts.get_mut(&path).and_then(VecDeque::pop_front);
        scripted
            .or_else(|| inner.defaults.get(&path).cloned())
            .unwrap_or(Answer::Status(200))
    };
    match answer {
        Answer::Status(s) => (
            StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            format!("answer {s}"),
        )
            .into_response(),
        Answer::RetryAfter(s, secs) => (
            StatusCode::from_u16(s).unwrap_or(StatusCode::TOO_MANY_REQUESTS),
            [("retry-after", secs.to_string())],
            "slow down",
        )
            .into_response(),
        Answer::Slow(d) => {
            tokio::time::sleep(d).await;
            (StatusCode::OK, "late").into_response()
        }
        Answer::Redirect(to) => {
            (StatusCode::TEMPORARY_REDIRECT, [("location", to)], "").into_response()
        }
    }
}

fn header_map(h: &HeaderMap) -> HashMap<String, String> {
    h.iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// A listener on 127.0.0.1:0 that reads a little of each connection and closes it without
/// answering. Returns its address; the task stops when the test's runtime ends.
pub async fn closing_server() -> SocketAddr {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port on 127.0.0.1");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            drop(conn);
        }
    });
    addr
}
