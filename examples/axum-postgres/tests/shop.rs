//! The axum-postgres example as it runs: `shop serve` (the platform with the shop's kind) and
//! `shop web` (the shop's own axum API) on one Postgres database. An order commits with its
//! receipt job, which the shop's own handler then runs; an order rolled back leaves no job.

use std::process::Command;
use std::time::Duration;

use conveyor_tests::TestStore;
use conveyor_tests::process::{Process, listening_addr};
use serde_json::{Value, json};

fn shop(url: &str, key: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shop"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CONVEYOR_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .current_dir(std::env::temp_dir())
        .env("CONVEYOR_DATABASE__URL", url)
        .env("CONVEYOR_SECRETS__KEYS", key)
        .env("RUST_LOG", "info");
    cmd
}

fn jobs(url: &str, key: &str) -> Vec<Value> {
    let out = shop(
        url,
        key,
        &["jobs", "list", "--kind", "shop.send_receipt", "--json"],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_commits_with_its_job_and_a_rolled_back_order_leaves_none() {
    let Some(store) = TestStore::postgres().await else {
        return;
    };
    let url = store.url.clone();
    let key = conveyor_worker::keyring::Key::generate()
        .to_base64()
        .to_string();
    let mut serve = Process::spawn(shop(&url, &key, &["serve", "--listen", "127.0.0.1:0"]));
    serve.wait_for_line("worker started", 60);
    let mut web = Process::spawn(shop(&url, &key, &["web", "127.0.0.1:0"]));
    let addr = listening_addr(&web.wait_for_line("shop listening on http://", 60));
    let http = reqwest::Client::new();

    // Committed: the order and its job exist; the shop's own handler sends the receipt.
    let answer = http
        .post(format!("http://{addr}/orders"))
        .json(&json!({"email": "ada@example.com", "quantity": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 201);
    let order: Value = answer.json().await.unwrap();
    let job_id = order["receipt_job"].as_str().unwrap().to_string();
    serve.wait_for_line("receipt sent", 30);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let mut sent: Option<String> = None;
    for _ in 0..100 {
        sent = sqlx::query_scalar("SELECT receipt_job FROM shop_orders WHERE id = $1")
            .bind(order["order"].as_i64().unwrap())
            .fetch_one(&pool)
            .await
            .unwrap();
        if sent.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        sent.as_deref(),
        Some(job_id.as_str()),
        "run by the job enqueued with the order"
    );
    let mut listed = Vec::new();
    for _ in 0..100 {
        listed = jobs(&url, &key);
        if listed.len() == 1 && listed[0]["state"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], job_id.as_str());
    assert_eq!(listed[0]["state"], "completed", "{listed:?}");
    assert_eq!(
        listed[0]["max_attempts"], 5,
        "the type's default: {listed:?}"
    );
    assert!(
        listed[0]["idempotency_key"]
            .as_str()
            .unwrap()
            .starts_with("unique:shop.send_receipt:"),
        "{listed:?}"
    );

    // Rolled back after the enqueue (out of stock): no order, no job.
    let answer = http
        .post(format!("http://{addr}/orders"))
        .json(&json!({"email": "bo@example.com", "quantity": 50}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 409);
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM shop_orders")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(orders, 1);
    let listed = jobs(&url, &key);
    assert_eq!(
        listed.len(),
        1,
        "the rolled-back job is not there: {listed:?}"
    );
    pool.close().await;
    drop(web);
    drop(serve);
    store.cleanup().await;
}
