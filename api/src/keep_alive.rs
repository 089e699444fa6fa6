//! Keeps an HTTP/1.1 connection usable after a request refused before its body was read.
//!
//! A request refused by the key check (`401`, `403`, `429`), the body limit (`413`) or any
//! handler that answers without reading the body leaves the body's bytes on the connection.
//! The HTTP server then closes the connection without saying so (it reads only what has
//! already arrived), and a client that reuses it for its next request gets a reset. This
//! layer reads what the handler left, up to [`DRAIN_LIMIT`] bytes within [`DRAIN_TIME`], so
//! the connection stays open; a larger or slower body gets `Connection: close` on the answer,
//! which clients honour by opening a new connection.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};

/// Most bytes read and dropped after a refusal.
pub const DRAIN_LIMIT: usize = 64 * 1024;
/// Longest wait for them.
pub const DRAIN_TIME: Duration = Duration::from_secs(1);

/// The middleware: hands the handler a body that reads from a shared slot, and drains what
/// is left in the slot once the handler has answered.
pub async fn drain_unread_body(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    if body.is_end_stream() {
        return next.run(Request::from_parts(parts, body)).await;
    }
    // `Expect: 100-continue`: the client sends the body only when asked, so nothing is left
    // on the connection unless the handler asked for it.
    let expects_continue = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let slot = Arc::new(Mutex::new(body));
    let shared = Body::new(Shared(slot.clone()));
    let mut response = next.run(Request::from_parts(parts, shared)).await;
    let body = std::mem::take(&mut *slot.lock().unwrap_or_else(PoisonError::into_inner));
    if body.is_end_stream() {
        return response;
    }
    let drained = !expects_continue
        && tokio::time::timeout(DRAIN_TIME, drain(body, DRAIN_LIMIT))
            .await
            .unwrap_or(false);
    if !drained {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Reads `body` to its end; false if it is longer than `limit` or fails.
async fn drain(mut body: Body, limit: usize) -> bool {
    let mut seen = 0usize;
    loop {
        match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            None => return true,
            Some(Err(_)) => return false,
            Some(Ok(frame)) => {
                seen += frame.data_ref().map_or(0, Bytes::len);
                if seen > limit {
                    return false;
                }
            }
        }
    }
}

/// The handler's view of the request body: reads through to the body in the slot, which
/// the middleware takes back afterwards.
struct Shared(Arc<Mutex<Body>>);

impl HttpBody for Shared {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let mut body = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        Pin::new(&mut *body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .size_hint()
    }
}
