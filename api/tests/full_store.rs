//! The API on a store that is full (Redis at `maxmemory` under `noeviction`, on a private
//! server): reads still answer, so an operator can look and purge; writes are refused with
//! a 503 that says the store is out of memory and what to do, not "did not answer".

mod common;

use common::{Server, send};
use conveyor_api::key::Scope;
use conveyor_tests::redis_server::PrivateRedis;
use conveyor_worker::store::{self, StoreOptions};
use conveyor_worker::{Error, NewJob};
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_answers_reads_and_refuses_writes_clearly() {
    let Some(server) = PrivateRedis::start(&[
        "--save",
        "",
        "--appendonly",
        "no",
        "--maxmemory",
        "4mb",
        "--maxmemory-policy",
        "noeviction",
    ])
    .await
    else {
        return;
    };
    let s = store::connect(
        &format!("{}?prefix=api", server.url()),
        StoreOptions::default(),
    )
    .await
    .expect("the private Redis opens");
    let api = Server::default(s.clone()).await;
    let read = api.key(Scope::Read).await;
    let enqueue = api.key(Scope::Enqueue).await;

    // Fill it until Redis refuses even a single small job.
    let big = "x".repeat(4000);
    let mut full = false;
    for _ in 0..5000 {
        match s
            .enqueue(NewJob::new("filler", json!({ "pad": big })))
            .await
        {
            Ok(_) => {}
            Err(Error::StoreFull(_)) => {
                full = true;
                break;
            }
            Err(e) => panic!("not a StoreFull error: {e:?}"),
        }
    }
    assert!(full, "Redis never filled up");

    // Reads answer: the rate limiter's bucket write is refused, and the request goes through.
    let (status, body) = send(api.req(Method::GET, "/v1/jobs?limit=5", Some(&read))).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = send(api.req(Method::GET, "/v1/queues", Some(&read))).await;
    assert_eq!(status, 200, "{body}");

    // Writes are refused with the store's own words.
    let (status, body) = send(
        api.req(Method::POST, "/v1/jobs", Some(&enqueue))
            .json(&json!({ "kind": "demo.echo", "args": { "msg": "hi" } })),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    let detail = body.to_string();
    assert!(
        detail.contains("out of memory") && detail.contains("maxmemory"),
        "{detail}"
    );
}
