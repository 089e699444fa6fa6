//! Redis only: a bulk enqueue whose answer is lost can be repeated. A proxy between the store
//! and Redis delivers a request, lets Redis apply it, then drops the connection before the
//! answer comes back, as a network cut or a failover would. A bulk enqueue goes out in parts,
//! several at once, so the lost call may have applied some parts and not others. The caller
//! sees an error and repeats the call:
//! - jobs with an idempotency key that the lost call made come back as duplicates of them,
//!   the others are inserted now, and every key is confirmed (no expiry), so later retries
//!   keep deduplicating;
//! - jobs without a key are enqueued again: nothing can tell a retry from a new job;
//! - when the lost answers were the key claims' (before any job was written), the failed
//!   call wrote nothing and freed its claims, and the retry inserts every job once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use conveyor_tests::TestStore;
use conveyor_worker::store::{self, JobFilter, Page, StoreOptions};
use conveyor_worker::{Enqueued, NewJob, Store};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy to Redis. Once armed, the first request containing `trigger` is delivered in
/// full (with whatever the client sends in the next moment), and the connection is then cut
/// without passing on any answer.
struct Proxy {
    port: u16,
    armed: Arc<AtomicBool>,
}

impl Proxy {
    async fn start(target: String, trigger: &'static [u8]) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(false));
        let flag = armed.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, target.clone(), flag.clone(), trigger));
            }
        });
        Proxy { port, armed }
    }

    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }
}

async fn relay(mut client: TcpStream, target: String, armed: Arc<AtomicBool>, trigger: &[u8]) {
    let Ok(mut server) = TcpStream::connect(&target).await else {
        return;
    };
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let (mut up, mut down) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    let mut cut_at: Option<tokio::time::Instant> = None;
    loop {
        let cut = async {
            match cut_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            n = cr.read(&mut up) => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                if cut_at.is_none()
                    && up[..n].windows(trigger.len()).any(|w| w == trigger)
                    && armed.swap(false, Ordering::SeqCst)
                {
                    // Give Redis time to read and apply everything sent so far.
                    cut_at = Some(tokio::time::Instant::now() + Duration::from_millis(300));
                }
                if sw.write_all(&up[..n]).await.is_err() {
                    return;
                }
            }
            n = sr.read(&mut down) => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                if cut_at.is_none() && cw.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
            () = cut => return,
        }
    }
}

/// `keyed` jobs with idempotency keys and `plain` jobs without, interleaved.
fn batch(tag: &str, keyed: usize, plain: usize) -> Vec<NewJob> {
    let mut jobs = Vec::new();
    for i in 0..keyed.max(plain) {
        if i < keyed {
            jobs.push(
                NewJob::new("k", json!({ "i": i }))
                    .queue("lost")
                    .idempotency_key(format!("{tag}-{i}")),
            );
        }
        if i < plain {
            jobs.push(NewJob::new("k", json!({ "plain": i })).queue("lost"));
        }
    }
    jobs
}

/// Every job in the store, a page at a time.
async fn all_jobs(s: &Arc<dyn Store>) -> Vec<conveyor_worker::Job> {
    let mut out: Vec<conveyor_worker::Job> = Vec::new();
    loop {
        let page = Page {
            before: out.last().map(|j| j.id),
            limit: 1000,
        };
        let jobs = s.list(&JobFilter::default(), page).await.unwrap();
        let done = jobs.len() < 1000;
        out.extend(jobs);
        if done {
            return out;
        }
    }
}

/// Repeats the call until it succeeds (the store reconnects after the cut).
async fn retried(s: &Arc<dyn Store>, jobs: &[NewJob]) -> Vec<Enqueued> {
    let mut last = None;
    for _ in 0..20 {
        match s.enqueue_many(jobs.to_vec()).await {
            Ok(answers) => return answers,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the retried enqueue never succeeded: {last:?}");
}

async fn ttl_of_keys(url: &str, prefix: &str, tag: &str, n: usize) -> Vec<i64> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.cmd("PTTL").arg(format!("{prefix}:key:{tag}-{i}"));
    }
    pipe.query_async(&mut conn).await.unwrap()
}

/// The store under test, reached through a proxy that cuts on `trigger`.
async fn through_proxy(t: &TestStore, trigger: &'static [u8]) -> (Proxy, Arc<dyn Store>, String) {
    let server = conveyor_tests::redis_url();
    let hostport = server
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let prefix = t.url.split("prefix=").nth(1).unwrap().to_string();
    let proxy = Proxy::start(hostport, trigger).await;
    let url = format!("redis://127.0.0.1:{}/0?prefix={prefix}", proxy.port);
    let s = store::connect(&url, StoreOptions::default()).await.unwrap();
    (proxy, s, prefix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_enqueue_whose_answer_was_lost_can_be_repeated() {
    let Some(t) = TestStore::redis().await else {
        return;
    };
    // The insert pipelines carry the only MULTI of an enqueue.
    let (proxy, s, prefix) = through_proxy(&t, b"MULTI").await;
    // Many parts' worth, so several inserts are in flight when the cut comes.
    let (keyed, plain) = (2000, 600);
    let jobs = batch("lost", keyed, plain);

    proxy.arm();
    let first = s.enqueue_many(jobs.clone()).await;
    assert!(first.is_err(), "the answer was cut off: {first:?}");
    // What the lost call applied: at least the part whose insert triggered the cut.
    let made = all_jobs(&s).await;
    let made_keys: HashSet<String> = made
        .iter()
        .filter_map(|j| j.idempotency_key.clone())
        .collect();
    let made_plain = made.iter().filter(|j| j.idempotency_key.is_none()).count();
    assert!(!made.is_empty(), "Redis applied part of the lost call");
    assert!(
        made.len() < keyed + plain,
        "parts after the failure were not sent"
    );

    let again = retried(&s, &jobs).await;
    let mut ids = HashSet::new();
    for (job, answer) in jobs.iter().zip(&again) {
        assert_eq!(
            answer.duplicate,
            job.idempotency_key
                .as_ref()
                .is_some_and(|k| made_keys.contains(k)),
            "a keyed job the lost call made is a duplicate of it; every other job is new"
        );
        ids.insert(answer.id);
    }
    assert_eq!(
        s.count(&JobFilter::default()).await.unwrap() as usize,
        keyed + plain + made_plain,
        "plain jobs the lost call made were enqueued again, keyed ones once"
    );
    // The duplicates name the jobs the lost call made, with their keys.
    let mut by_key = HashMap::new();
    for (job, answer) in jobs.iter().zip(&again) {
        if let Some(key) = &job.idempotency_key {
            by_key.insert(key.clone(), answer.id);
        }
    }
    for (key, id) in by_key
        .iter()
        .filter(|(k, _)| made_keys.contains(*k))
        .take(50)
    {
        let stored = s.get(*id).await.unwrap().expect("the lost call's job");
        assert_eq!(stored.idempotency_key.as_deref(), Some(key.as_str()));
    }
    assert_eq!(ids.len(), keyed + plain);
    assert!(
        ttl_of_keys(&conveyor_tests::redis_url(), &prefix, "lost", keyed)
            .await
            .iter()
            .all(|ttl| *ttl == -1),
        "every key is confirmed: it lives as long as its job"
    );
    drop(s);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_whose_key_claims_lost_their_answer_can_be_repeated() {
    let Some(t) = TestStore::redis().await else {
        return;
    };
    // Only the key claims carry `NX`.
    let (proxy, s, _) = through_proxy(&t, b"\r\nNX\r\n").await;
    let (keyed, plain) = (1500, 10);
    let jobs = batch("claim", keyed, plain);

    proxy.arm();
    assert!(s.enqueue_many(jobs.clone()).await.is_err());
    assert_eq!(s.count(&JobFilter::default()).await.unwrap(), 0);

    // The failed call freed the claims it made, so the retry need not wait for them to expire.
    let again = retried(&s, &jobs).await;
    assert!(again.iter().all(|a| !a.duplicate), "{:?}", &again[..3]);
    assert_eq!(
        s.count(&JobFilter::default()).await.unwrap() as usize,
        keyed + plain
    );
    drop(s);
    t.cleanup().await;
}
