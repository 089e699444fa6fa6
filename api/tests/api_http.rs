//! The API at the HTTP level: connections a refusal leaves usable, bodies refused at any
//! depth, and an OpenAPI document that says what the server answers.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Server, send};
use conveyor_api::ApiConfig;
use conveyor_api::config::RateLimitConfig;
use conveyor_api::key::Scope;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One answer read off a raw connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// Reads one HTTP/1.1 response with a `Content-Length` from `conn`; `None` if the server
/// closed the connection first.
async fn read_answer(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Answer> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
            let headers: BTreeMap<String, String> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let length: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into_owned();
                buf.drain(..end + 4 + length);
                return Some(Answer {
                    status,
                    headers,
                    body,
                });
            }
        }
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout_at(deadline, conn.read(&mut chunk))
            .await
            .expect("the server answers within 10 s")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Sends `method path` with `key` and `body` on `conn` the way a slow client does: the
/// headers, 50 ms of nothing, then the body.
async fn send_slowly(conn: &mut TcpStream, method: &str, path: &str, key: &str, body: &[u8]) {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The server may already have answered (and, if it closes, reset): a failed write shows
    // up as a closed connection in the reads that follow.
    let _ = conn.write_all(body).await;
}

/// A refusal decided before the body is read (401, 403, 429) leaves the connection open for
/// the client's next request, even when the body arrives after the answer was decided.
#[tokio::test]
async fn a_refusal_before_the_body_keeps_the_connection_usable() {
    let t = conveyor_tests::TestStore::sqlite().await;
    let config = ApiConfig {
        rate_limit: RateLimitConfig {
            enabled: true,
            per_second: 0.001,
            burst: 2.0,
        },
        ..ApiConfig::default()
    };
    let s = Server::start(t.store.clone(), config).await;
    let read = s.key(Scope::Read).await;
    let limited = s.key(Scope::Enqueue).await;
    let job = serde_json::to_vec(&json!({"kind": "demo.echo", "args": {"msg": "hi"}})).unwrap();
    let addr = s.base.trim_start_matches("http://").to_string();

    // Use up the limited key's burst, so its next request is a 429.
    for _ in 0..2 {
        let (status, p) = send(
            s.req(Method::POST, "/v1/jobs", Some(&limited))
                .json(&json!({"kind": "demo.echo"})),
        )
        .await;
        assert_eq!(status, 201, "{p}");
    }
    let cases = [
        ("cvk_nope_nope", 401),
        (read.as_str(), 403),
        (limited.as_str(), 429),
    ];
    for (key, expected) in cases {
        let mut conn = TcpStream::connect(&addr).await.unwrap();
        let mut buf = Vec::new();
        send_slowly(&mut conn, "POST", "/v1/jobs", key, &job).await;
        let first = read_answer(&mut conn, &mut buf)
            .await
            .expect("an answer to the first request");
        assert_eq!(first.status, expected, "{first:?}");
        assert_ne!(
            first.headers.get("connection").map(String::as_str),
            Some("close"),
            "{first:?}"
        );
        conn.write_all(b"GET /livez HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let second = read_answer(&mut conn, &mut buf)
            .await
            .unwrap_or_else(|| panic!("the connection was closed after a {expected}: {first:?}"));
        assert_eq!((second.status, second.body.as_str()), (200, "ok\n"));
    }
    // Nothing was enqueued by the refused requests.
    assert_eq!(t.store.count(&Default::default()).await.unwrap(), 2);
    t.cleanup().await;
}

/// A body too large to read says `Connection: close`, so the client opens a new connection
/// instead of writing into one the server is closing.
#[tokio::test]
async fn a_body_too_large_to_drain_closes_the_connection_and_says_so() {
    let t = conveyor_tests::TestStore::sqlite().await;
    let config = ApiConfig {
        body_limit: 1024,
        args_limit: 1024,
        ..ApiConfig::default()
    };
    let s = Server::start(t.store.clone(), config).await;
    let key = s.key(Scope::Enqueue).await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let big =
        serde_json::to_vec(&json!({"kind": "demo.echo", "args": {"pad": "x".repeat(200_000)}}))
            .unwrap();
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    let mut buf = Vec::new();
    send_slowly(&mut conn, "POST", "/v1/jobs", &key, &big).await;
    let answer = read_answer(&mut conn, &mut buf).await.expect("an answer");
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(
        answer.headers.get("connection").map(String::as_str),
        Some("close"),
        "{answer:?}"
    );
    // A small body over the limit is read and dropped: the connection lives.
    let small =
        serde_json::to_vec(&json!({"kind": "demo.echo", "args": {"pad": "x".repeat(2000)}}))
            .unwrap();
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    let mut buf = Vec::new();
    send_slowly(&mut conn, "POST", "/v1/jobs", &key, &small).await;
    let answer = read_answer(&mut conn, &mut buf).await.expect("an answer");
    assert_eq!(answer.status, 413, "{answer:?}");
    conn.write_all(b"GET /livez HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let second = read_answer(&mut conn, &mut buf)
        .await
        .unwrap_or_else(|| panic!("closed after a drained 413: {answer:?}"));
    assert_eq!(second.status, 200);
    t.cleanup().await;
}

/// An object sent as an array is refused wherever it is, with the field's path.
#[tokio::test]
async fn nested_positional_arrays_are_refused_naming_the_field() {
    let t = conveyor_tests::TestStore::sqlite().await;
    let s = Server::default(t.store.clone()).await;
    let key = s.key(Scope::Admin).await;
    let cases = [
        (
            "/v1/jobs/batch",
            json!({"jobs": [["demo.echo", {"msg": "hi"}]]}),
            "jobs[0]",
        ),
        (
            "/v1/jobs/batch",
            json!({"jobs": [{"kind": "demo.echo"}, ["demo.echo"]]}),
            "jobs[1]",
        ),
        (
            "/v1/jobs/bulk/retry",
            json!({"filter": [["dead"]], "all": false}),
            "filter",
        ),
        ("/v1/jobs", json!(["demo.echo"]), "body"),
    ];
    for (path, body, field) in cases {
        let (status, p) = send(s.req(Method::POST, path, Some(&key)).json(&body)).await;
        assert_eq!(status, 422, "{path} {body}: {p}");
        assert_eq!(p["errors"][0]["field"], field, "{path} {body}: {p}");
        assert!(
            p["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("JSON object with named fields"),
            "{p}"
        );
    }
    assert_eq!(t.store.count(&Default::default()).await.unwrap(), 0);
    // Arrays where the schema has arrays are read as before.
    let (status, p) = send(
        s.req(Method::POST, "/v1/jobs/batch", Some(&key))
            .json(&json!({"jobs": [{"kind": "demo.echo", "tags": ["a"], "args": [1, 2]}]})),
    )
    .await;
    assert_eq!(status, 201, "{p}");
    t.cleanup().await;
}

fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            out.push((method.to_uppercase(), path.clone(), op));
        }
    }
    out
}

/// The document says what the server answers: problems as `application/problem+json`, the
/// refusals of the key check and the body reader on every operation that has them, lists
/// as arrays, webhook answers as typed schemas, and request bodies closed to unknown fields.
#[tokio::test]
async fn the_openapi_document_declares_every_refusal_and_shape() {
    let doc = serde_json::to_value(conveyor_api::openapi()).unwrap();
    for (method, path, op) in operations(&doc) {
        let responses = op["responses"].as_object().unwrap();
        for (status, response) in responses {
            let content = response["content"].as_object();
            let is_problem = content.is_some_and(|c| {
                c.values()
                    .any(|m| m["schema"]["$ref"] == "#/components/schemas/Problem")
            });
            if is_problem {
                assert!(
                    content.unwrap().contains_key("application/problem+json")
                        && !content.unwrap().contains_key("application/json"),
                    "{method} {path} {status}: {response}"
                );
            }
        }
        let needs: &[&str] = if op.get("security").is_some() {
            &["401", "403", "429", "503"]
        } else {
            &[]
        };
        for status in needs {
            assert!(
                responses.contains_key(*status),
                "{method} {path} lacks {status}"
            );
        }
        if op.get("requestBody").is_some() {
            for status in ["400", "413", "415", "422"] {
                assert!(
                    responses.contains_key(status),
                    "{method} {path} lacks {status}"
                );
            }
        }
        if let Some(r) = responses.get("429") {
            assert!(r["headers"].get("Retry-After").is_some(), "{method} {path}");
        }
    }

    let ok_schema = |method: &str, path: &str, status: &str| {
        doc["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
            .clone()
    };
    for (path, item) in [
        ("/v1/webhooks/endpoints", "#/components/schemas/Endpoint"),
        ("/v1/schedules", ""),
        ("/v1/workers", ""),
        ("/v1/queues", ""),
        (
            "/v1/webhooks/endpoints/{endpoint}/secret",
            "#/components/schemas/Secret",
        ),
        (
            "/v1/events/{event}/attempts",
            "#/components/schemas/Attempt",
        ),
    ] {
        let schema = ok_schema("get", path, "200");
        assert_eq!(schema["type"], "array", "GET {path}: {schema}");
        if !item.is_empty() {
            assert_eq!(schema["items"]["$ref"], item, "GET {path}: {schema}");
        }
    }
    for (method, path, status, name) in [
        ("post", "/v1/webhooks/endpoints", "201", "Endpoint"),
        (
            "get",
            "/v1/webhooks/endpoints/{endpoint}",
            "200",
            "Endpoint",
        ),
        (
            "get",
            "/v1/webhooks/endpoints/{endpoint}/attempts",
            "200",
            "AttemptPage",
        ),
        (
            "get",
            "/v1/webhooks/endpoints/{endpoint}/health",
            "200",
            "Health",
        ),
        ("post", "/v1/events", "201", "Sent"),
        ("get", "/v1/events/{event}", "200", "Event"),
        ("post", "/v1/events/{event}/replay", "200", "Replayed"),
    ] {
        assert_eq!(
            ok_schema(method, path, status)["$ref"],
            format!("#/components/schemas/{name}"),
            "{method} {path}"
        );
    }
    // Request bodies that refuse unknown fields say so.
    for name in [
        "EnqueueRequest",
        "BatchRequest",
        "BulkRequest",
        "NewEndpoint",
        "EndpointPatch",
        "EventRequest",
        "MessageRequest",
    ] {
        let schema = &doc["components"]["schemas"][name];
        assert_eq!(schema["additionalProperties"], false, "{name}: {schema}");
    }
    // Constraints the server enforces are in the schema.
    let enqueue = &doc["components"]["schemas"]["EnqueueRequest"]["properties"];
    assert_eq!(enqueue["max_attempts"]["minimum"], 1, "{enqueue}");
    assert_eq!(enqueue["max_attempts"]["maximum"], 1000, "{enqueue}");
    assert!(enqueue["kind"]["pattern"].is_string(), "{enqueue}");
    assert_eq!(enqueue["tags"]["maxItems"], 32, "{enqueue}");
}
