//! A shop: an axum application that takes orders and, in the same Postgres transaction as
//! each order, enqueues the job that sends its receipt; its workers run on the platform.
//!
//! - `shop web [ADDR]`: the shop's own HTTP API, `POST /orders` (default `127.0.0.1:3000`).
//! - `shop serve`, `shop worker`, `shop jobs list`, …: the Conveyor platform with the shop's
//!   kind `shop.send_receipt` registered beside the built-in ones.
//!
//! Both read the database from `CONVEYOR_DATABASE__URL` (a Postgres URL): the shop's tables
//! live in its `public` schema, the jobs in `conveyor`. An order and its receipt job commit
//! together or not at all. See docs/own-jobs.md.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use conveyor::{App, JobArgs, JobContext, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgPool;

/// The receipt of one order: the args of the kind `shop.send_receipt`, shared by the web
/// handler that enqueues it and the worker that runs it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendReceipt {
    /// The order's id in `shop_orders`.
    pub order: i64,
}

impl JobArgs for SendReceipt {
    const KIND: &'static str = "shop.send_receipt";
    const MAX_ATTEMPTS: i32 = 5;
    const TIMEOUT: Option<Duration> = Some(Duration::from_secs(30));
    // One receipt job per order a day, however often it is asked for.
    const UNIQUE_FOR: Option<Duration> = Some(Duration::from_secs(24 * 3600));
}

/// Most items one order may take.
const STOCK: i32 = 10;

/// Sends the receipt (here: records it on the order).
async fn send_receipt(pool: PgPool, args: SendReceipt, ctx: JobContext) -> anyhow::Result<Outcome> {
    let sent = sqlx::query(
        "UPDATE shop_orders SET receipt_sent_at = now(), receipt_job = $2 \
         WHERE id = $1 AND receipt_sent_at IS NULL",
    )
    .bind(args.order)
    .bind(ctx.job.id.to_string())
    .execute(&pool)
    .await?
    .rows_affected();
    if sent == 0 {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM shop_orders WHERE id = $1)")
                .bind(args.order)
                .fetch_one(&pool)
                .await?;
        if !exists {
            // The job commits with its order, so this is a bug, not a race: do not retry.
            return Ok(Outcome::fail(format!(
                "order {} does not exist",
                args.order
            )));
        }
    }
    tracing::info!(order = args.order, "receipt sent");
    Ok(Outcome::Done)
}

/// `POST /orders`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewOrder {
    email: String,
    quantity: i32,
}

type Refusal = (StatusCode, Json<Value>);

fn refusal(status: StatusCode, detail: impl std::fmt::Display) -> Refusal {
    (status, Json(json!({ "detail": detail.to_string() })))
}

/// Takes an order: the order row and its receipt job in one transaction.
async fn create_order(
    State(pool): State<PgPool>,
    Json(order): Json<NewOrder>,
) -> Result<(StatusCode, Json<Value>), Refusal> {
    let internal = |e: &dyn std::fmt::Display| refusal(StatusCode::INTERNAL_SERVER_ERROR, e);
    let mut tx = pool.begin().await.map_err(|e| internal(&e))?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO shop_orders (email, quantity) VALUES ($1, $2) RETURNING id",
    )
    .bind(&order.email)
    .bind(order.quantity)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| internal(&e))?;
    let job = conveyor_client::enqueue_in(&mut tx, SendReceipt { order: id })
        .send()
        .await
        .map_err(|e| internal(&e))?;
    if order.quantity > STOCK {
        // Returning drops `tx`: the order and its receipt job are rolled back together.
        return Err(refusal(
            StatusCode::CONFLICT,
            format!("only {STOCK} in stock, {} ordered", order.quantity),
        ));
    }
    tx.commit().await.map_err(|e| internal(&e))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "order": id, "receipt_job": job.id })),
    ))
}

/// The shop's HTTP API on `addr`, until Ctrl-C or SIGTERM.
async fn web(pool: PgPool, url: &str, addr: &str) -> anyhow::Result<()> {
    // Migrates the job tables, so the shop can take orders before a worker ever started.
    conveyor_worker::store::connect(url, conveyor_worker::StoreOptions::default()).await?;
    let app = axum::Router::new()
        .route("/orders", post(create_order))
        .with_state(pool);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("shop listening on http://{}", listener.local_addr()?);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await?;
    Ok(())
}

/// The shop's pool, with its table in place.
async fn shop_pool(url: &str) -> anyhow::Result<PgPool> {
    let pool = PgPool::connect(url).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS shop_orders (
            id bigserial PRIMARY KEY,
            email text NOT NULL,
            quantity int NOT NULL,
            receipt_sent_at timestamptz,
            receipt_job text
        )",
    )
    .execute(&pool)
    .await?;
    Ok(pool)
}

#[tokio::main]
async fn main() -> ExitCode {
    let Ok(url) = std::env::var("CONVEYOR_DATABASE__URL") else {
        eprintln!(
            "error: set CONVEYOR_DATABASE__URL to the shop's Postgres database, \
             e.g. postgres://postgres@127.0.0.1:5432/shop"
        );
        return ExitCode::from(2);
    };
    let pool = match shop_pool(&url).await {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("error: cannot open the shop's database: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("web") {
        let addr = args.get(2).map_or("127.0.0.1:3000", String::as_str);
        return match web(pool, &url, addr).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    App::new()
        .handle(move |args: SendReceipt, ctx| send_receipt(pool.clone(), args, ctx))
        .run_with(std::env::args_os())
        .await
}
