//! Redis only: the server settings production Redis comes with. Each test runs a private
//! `redis-server` (never the shared one other tests use: these change its memory settings)
//! on a free loopback port, killed when the test ends.
//!
//! - A `maxmemory-policy` that evicts is refused at start, unless the URL allows it.
//! - A server that keeps nothing across a restart is warned about.
//! - A full server (`noeviction` at `maxmemory`) refuses writes with [`Error::StoreFull`]
//!   saying what to do, still starts and answers reads, leaves no idempotency claim or index
//!   entry behind for the jobs it refused, loses nothing it acknowledged, and takes the rest
//!   once it has room again.
//! - A worker whose outcome writes are refused mid-run claims nothing more meanwhile and
//!   completes every job once Redis has room again.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_tests::eventually;
use conveyor_tests::redis_server::PrivateRedis;
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::store::redis::{RedisStore, persistence_warnings};
use conveyor_worker::store::{self, FetchRequest, JobFilter, Page, StoreOptions};
use conveyor_worker::{
    AttemptOutcome, Error, JobContext, JobId, JobState, NewJob, Outcome, Registry, Store,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const NO_PERSISTENCE: [&str; 4] = ["--save", "", "--appendonly", "no"];

fn is_store_full(e: &Error) -> bool {
    matches!(e, Error::StoreFull(msg) if msg.contains("out of memory") && msg.contains("maxmemory"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_may_evict_keys_is_refused_unless_the_url_allows_it() {
    let mut args = NO_PERSISTENCE.to_vec();
    args.extend(["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]);
    let Some(server) = PrivateRedis::start(&args).await else {
        return;
    };
    let url = format!("{}?prefix=jobs", server.url());

    let refused = store::connect(&url, StoreOptions::default())
        .await
        .err()
        .expect("a server with allkeys-lru is refused");
    let msg = refused.to_string();
    for needed in [
        "allkeys-lru",
        "CONFIG SET maxmemory-policy noeviction",
        "allow_eviction=true",
    ] {
        assert!(msg.contains(needed), "the refusal lacks `{needed}`: {msg}");
    }
    let keys: i64 = redis::cmd("DBSIZE")
        .query_async(&mut server.conn().await)
        .await
        .unwrap();
    assert_eq!(keys, 0, "a refused start wrote to the server");

    // The override, beside another parameter: it starts, says why it is risky, and works.
    let allowed = RedisStore::connect(
        &format!("{url}&allow_eviction=true"),
        &StoreOptions::default(),
    )
    .await
    .expect("allow_eviction=true starts on a server that evicts");
    assert!(
        allowed
            .server_warnings()
            .iter()
            .any(|w| w.contains("allkeys-lru")),
        "no warning about eviction: {:?}",
        allowed.server_warnings()
    );
    assert_eq!(allowed.prefix(), "jobs");
    allowed.migrate().await.unwrap();
    let job = allowed
        .enqueue(NewJob::new("tick", json!({})))
        .await
        .unwrap();
    assert!(allowed.get(job.id).await.unwrap().is_some());
    assert!(
        store::connect(
            &format!("{url}&allow_eviction=maybe"),
            StoreOptions::default()
        )
        .await
        .is_err(),
        "a bad allow_eviction value is accepted"
    );

    // Once the operator fixes the policy, a plain URL starts without the warning.
    server.set_config("maxmemory-policy", "noeviction").await;
    let fixed = RedisStore::connect(&url, &StoreOptions::default())
        .await
        .expect("noeviction starts");
    assert!(
        !fixed
            .server_warnings()
            .iter()
            .any(|w| w.contains("maxmemory-policy")),
        "{:?}",
        fixed.server_warnings()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_keeps_nothing_across_a_restart_is_warned_about() {
    let warnings = |args: &'static [&'static str]| async move {
        let server = PrivateRedis::start(args).await?;
        let store = RedisStore::connect(&server.url(), &StoreOptions::default())
            .await
            .expect("the private Redis opens");
        Some(store.server_warnings().to_vec())
    };
    let Some(none) = warnings(&["--save", "", "--appendonly", "no"]).await else {
        return;
    };
    assert_eq!(none.len(), 1, "{none:?}");
    for needed in ["append-only", "snapshots", "restart", "appendonly yes"] {
        assert!(
            none[0].contains(needed),
            "the warning lacks `{needed}`: {none:?}"
        );
    }
    let aof = warnings(&["--save", "", "--appendonly", "yes"])
        .await
        .unwrap();
    assert!(aof.is_empty(), "{aof:?}");
    let rdb = warnings(&["--save", "60 1000", "--appendonly", "no"])
        .await
        .unwrap();
    assert!(rdb.is_empty(), "{rdb:?}");
    // Managed Redis that refuses CONFIG (and here INFO too): the store starts, and says
    // what it could not check.
    let managed = warnings(&[
        "--save",
        "",
        "--rename-command",
        "CONFIG",
        "",
        "--rename-command",
        "INFO",
        "",
    ])
    .await
    .unwrap();
    assert_eq!(managed.len(), 2, "{managed:?}");
    assert!(
        managed[0].contains("could not read the maxmemory-policy"),
        "{managed:?}"
    );
    assert!(managed[1].contains("could not confirm"), "{managed:?}");
    let unknown = persistence_warnings("redis://h:6379/0", Some(false), None);
    assert!(
        unknown.len() == 1 && unknown[0].contains("could not confirm"),
        "{unknown:?}"
    );
}

/// Every idempotency key of `prefix` with its holder, its expiry (ms, -1: none) and whether
/// the holder's job exists.
async fn key_holders(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> Vec<(String, String, i64, bool)> {
    let keys: Vec<String> = conveyor_tests::keys_with_prefix(conn, prefix)
        .await
        .unwrap()
        .into_iter()
        .filter(|k| k.starts_with(&format!("{prefix}:key:")))
        .collect();
    let mut out = Vec::new();
    for key in keys {
        let (holder, ttl): (String, i64) = redis::pipe()
            .cmd("GET")
            .arg(&key)
            .cmd("PTTL")
            .arg(&key)
            .query_async(conn)
            .await
            .unwrap();
        let (queue, id) = holder.split_once('/').unwrap();
        let exists: bool = redis::cmd("EXISTS")
            .arg(format!("{{{prefix}:{queue}}}:job:{id}"))
            .query_async(conn)
            .await
            .unwrap();
        out.push((key, holder, ttl, exists));
    }
    out
}

fn batch(from: usize, n: usize) -> Vec<NewJob> {
    (from..from + n)
        .map(|i| {
            NewJob::new("tick", json!({ "n": i, "pad": "x".repeat(200) }))
                .idempotency_key(format!("order-{i}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_refuses_writes_clearly_answers_reads_and_loses_nothing() {
    let mut args = NO_PERSISTENCE.to_vec();
    args.extend(["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]);
    let Some(server) = PrivateRedis::start(&args).await else {
        return;
    };
    let prefix = "full";
    let url = format!("{}?prefix={prefix}", server.url());
    let s = store::connect(&url, StoreOptions::default())
        .await
        .expect("the private Redis opens");

    // Fill it with batches of keyed jobs until Redis refuses one.
    const BATCH: usize = 1000;
    let mut acked: Vec<JobId> = Vec::new();
    let mut failed = None;
    for round in 0..100 {
        match s.enqueue_many(batch(round * BATCH, BATCH)).await {
            Ok(answers) => acked.extend(answers.into_iter().map(|a| a.id)),
            Err(e) => {
                failed = Some((round, e));
                break;
            }
        }
    }
    let (round, error) = failed.expect("Redis never filled up");
    assert!(is_store_full(&error), "not a StoreFull error: {error:?}");
    let msg = error.to_string();
    for needed in ["CONFIG SET maxmemory", "conveyor dead purge", "retention"] {
        assert!(msg.contains(needed), "the message lacks `{needed}`: {msg}");
    }
    eprintln!("full after {} acknowledged jobs: {msg}", acked.len());
    assert!(
        msg.contains("of the 1000 jobs of this enqueue were stored"),
        "the message does not say that part of the batch is stored: {msg}"
    );

    // The claims, index entries and client buffers the refused batch let go of make room
    // for a few more small jobs; then Redis stays full.
    let mut singles = Vec::new();
    let full = loop {
        match s.enqueue(NewJob::new("tick", json!({}))).await {
            Ok(job) => singles.push(job.id),
            Err(e) => break e,
        }
        assert!(singles.len() < 5000, "Redis never refused a single job");
    };
    assert!(is_store_full(&full), "{full:?}");

    // Nothing the failed batch refused holds a key or an index entry: every key is
    // confirmed and its job exists, and the index holds exactly the stored jobs.
    let mut conn = server.conn().await;
    let holders = key_holders(&mut conn, prefix).await;
    let stray: Vec<_> = holders
        .iter()
        .filter(|(_, _, ttl, e)| *ttl != -1 || !e)
        .collect();
    assert!(
        stray.is_empty(),
        "idempotency claims left behind: {:?}",
        &stray[..stray.len().min(5)]
    );
    let stored = s
        .count(&JobFilter::default())
        .await
        .expect("count on a full store");
    assert_eq!(
        holders.len() as u64,
        stored - singles.len() as u64,
        "keys and keyed jobs differ"
    );
    let indexed: u64 = redis::cmd("HLEN")
        .arg(format!("{prefix}:index"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(indexed, stored, "the id index holds entries without a job");
    let partial = stored - acked.len() as u64 - singles.len() as u64;
    eprintln!("the refused batch left {partial} of its {BATCH} jobs stored");

    // Reads work on the full store, and so does a fresh start (a CLI command, a restart).
    let page = s
        .list(
            &JobFilter::default(),
            Page {
                before: None,
                limit: 50,
            },
        )
        .await
        .expect("list on a full store");
    assert_eq!(page.len(), 50);
    assert!(
        s.get(acked[0])
            .await
            .expect("get on a full store")
            .is_some()
    );
    let stats = s.queue_stats().await.expect("queue stats on a full store");
    assert_eq!(stats[0].counts[&JobState::Available] as u64, stored);
    let again = store::connect(&url, StoreOptions::default())
        .await
        .expect("a process starts on a full store");
    assert_eq!(again.count(&JobFilter::default()).await.unwrap(), stored);
    // Deleting frees memory, so Redis allows it while full.
    let gone = acked.pop().unwrap();
    s.discard(gone).await.expect("discard on a full store");
    assert!(s.get(gone).await.unwrap().is_none());
    // A worker claims nothing it could not finish.
    let claim = s
        .fetch(FetchRequest {
            queue: "default",
            limit: 10,
            worker: "w1",
            lease: Duration::from_secs(30),
        })
        .await;
    assert!(matches!(&claim, Err(e) if is_store_full(e)), "{claim:?}");
    assert_eq!(
        s.count(&JobFilter::state(JobState::Running)).await.unwrap(),
        0,
        "a refused fetch claimed jobs"
    );

    // With room again, the refused batch goes in once: what it stored comes back as
    // duplicates, the rest is inserted, and every acknowledged job is still there.
    server.set_config("maxmemory", "0").await;
    let answers = s
        .enqueue_many(batch(round * BATCH, BATCH))
        .await
        .expect("the refused batch, sent again");
    let duplicates = answers.iter().filter(|a| a.duplicate).count() as u64;
    assert_eq!(
        duplicates, partial,
        "duplicates are not what the refused batch stored"
    );
    let total = acked.len() as u64 + BATCH as u64;
    assert_eq!(
        s.count(&JobFilter::default()).await.unwrap(),
        total + singles.len() as u64
    );
    let holders = key_holders(&mut conn, prefix).await;
    assert_eq!(holders.len() as u64, total);
    acked.extend(singles);
    assert!(holders.iter().all(|(_, _, ttl, e)| *ttl == -1 && *e));
    let mut found = 0;
    for chunk in acked.chunks(1000) {
        let filter = JobFilter {
            ids: chunk.to_vec(),
            ..JobFilter::default()
        };
        found += s
            .list(
                &filter,
                Page {
                    before: None,
                    limit: 1000,
                },
            )
            .await
            .unwrap()
            .len();
    }
    assert_eq!(found, acked.len(), "acknowledged jobs were lost");
    let distinct: BTreeSet<JobId> = answers.iter().map(|a| a.id).collect();
    assert_eq!(distinct.len(), BATCH);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_whose_outcome_writes_are_refused_finishes_every_job_once_redis_has_room() {
    let mut args = NO_PERSISTENCE.to_vec();
    args.extend(["--maxmemory-policy", "noeviction"]);
    let Some(server) = PrivateRedis::start(&args).await else {
        return;
    };
    const JOBS: usize = 300;
    const CONCURRENCY: usize = 8;
    const BEFORE: usize = 100;
    let s = store::connect(&server.url(), StoreOptions::default())
        .await
        .expect("the private Redis opens");
    let ids: Vec<JobId> = s
        .enqueue_many((0..JOBS).map(|_| NewJob::new("tick", json!({}))).collect())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();

    // After BEFORE runs, handlers wait for the gate: Redis fills up while they run, so
    // their outcomes are refused.
    let runs: Arc<Mutex<HashMap<JobId, usize>>> = Arc::default();
    let (gate, opened) = tokio::sync::watch::channel(false);
    let mut registry = Registry::new();
    let r = runs.clone();
    registry.register("tick", move |_: serde_json::Value, ctx: JobContext| {
        let r = r.clone();
        let mut opened = opened.clone();
        async move {
            let n = {
                let mut runs = r.lock().unwrap();
                *runs.entry(ctx.job.id).or_default() += 1;
                runs.values().sum::<usize>()
            };
            if n > BEFORE {
                let _ = opened.wait_for(|open| *open).await;
            }
            Ok(Outcome::Done)
        }
    });
    let worker = Worker::new(
        s.clone(),
        registry,
        WorkerConfig {
            queues: vec![QueueConfig {
                name: "default".into(),
                concurrency: CONCURRENCY as u32,
            }],
            poll_interval: Duration::from_millis(50),
            shutdown_grace: Duration::from_secs(5),
            ..WorkerConfig::default()
        },
    )
    .expect("valid config");
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(worker.run(shutdown.clone()));
    let total_runs = |r: &Arc<Mutex<HashMap<JobId, usize>>>| r.lock().unwrap().values().sum();
    eventually(15, "handlers waiting at the gate", || {
        // Not all CONCURRENCY: with a backlog the fetch loop waits for a few free slots.
        let n: usize = total_runs(&runs);
        async move { (n >= BEFORE + CONCURRENCY / 2).then_some(()) }
    })
    .await;

    // Redis is full: the running jobs end, their outcomes are refused.
    server.set_config("maxmemory", "1").await;
    gate.send(true).unwrap();
    let refused = s.enqueue(NewJob::new("tick", json!({}))).await.unwrap_err();
    assert!(is_store_full(&refused), "{refused:?}");
    // For a while nothing is claimed beyond what ran when Redis filled up.
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut most = 0;
    while tokio::time::Instant::now() < until {
        let running = s.count(&JobFilter::state(JobState::Running)).await.unwrap();
        most = most.max(running);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        most <= CONCURRENCY as u64,
        "{most} jobs running while Redis refused every outcome (concurrency {CONCURRENCY})"
    );
    let during: usize = total_runs(&runs);
    assert!(during < JOBS, "every job ran before Redis filled up");

    // Room again: every job completes, each with one completed attempt.
    server.set_config("maxmemory", "0").await;
    eventually(20, "every job completed", || {
        let s = s.clone();
        async move {
            let n = s.count(&JobFilter::state(JobState::Completed)).await.ok()?;
            (n == JOBS as u64).then_some(())
        }
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("the worker stops")
        .expect("worker task did not panic")
        .expect("worker shut down cleanly");
    for chunk in ids.chunks(100) {
        let filter = JobFilter {
            ids: chunk.to_vec(),
            ..JobFilter::default()
        };
        let jobs = s
            .list(
                &filter,
                Page {
                    before: None,
                    limit: 100,
                },
            )
            .await
            .unwrap();
        assert_eq!(jobs.len(), chunk.len(), "jobs were lost");
        for job in jobs {
            let completed = job
                .attempts
                .iter()
                .filter(|a| a.outcome == AttemptOutcome::Completed)
                .count();
            assert_eq!(completed, 1, "job {}: {:?}", job.id, job.attempts);
        }
    }
}
