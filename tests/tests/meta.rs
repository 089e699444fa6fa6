//! The shared-records store (`MetaStore`) on every backend: versions and preconditions,
//! concurrent writers, expiry and pruning, ordered paging with prefixes, and token buckets
//! shared between two connections.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use conveyor_tests::backend_tests;
use conveyor_worker::Error;
use conveyor_worker::Store;
use conveyor_worker::store::meta::{Expect, MetaQuery, Put, RateLimit};
use serde_json::json;

async fn versions_and_preconditions(s: Arc<dyn Store>) {
    let v1 = json!({"cron": "0 * * * *", "name": "ünïcode ✓"});
    let created = s
        .meta_put(Put::new("schedules", "nightly", &v1).expect(Expect::Absent))
        .await
        .unwrap();
    assert_eq!(created.version, 1);
    let got = s.meta_get("schedules", "nightly").await.unwrap().unwrap();
    assert_eq!(got.value, v1);
    assert_eq!(got.version, 1);
    assert_eq!(got.updated_at, created.updated_at);

    // Create-only refuses an existing record.
    let err = s
        .meta_put(Put::new("schedules", "nightly", &v1).expect(Expect::Absent))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Conflict(m) if m.contains("already exists")),
        "{err}"
    );

    // Update at the version read; a stale version is refused and changes nothing.
    let v2 = json!({"cron": "5 * * * *"});
    let updated = s
        .meta_put(Put::new("schedules", "nightly", &v2).expect(Expect::Version(1)))
        .await
        .unwrap();
    assert_eq!(updated.version, 2);
    let err = s
        .meta_put(Put::new("schedules", "nightly", &v1).expect(Expect::Version(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Conflict(m) if m.contains("expected version 1, found 2")),
        "{err}"
    );
    assert_eq!(
        s.meta_get("schedules", "nightly")
            .await
            .unwrap()
            .unwrap()
            .value,
        v2
    );
    // Updating a missing record is refused too.
    assert!(matches!(
        s.meta_put(Put::new("schedules", "missing", &v1).expect(Expect::Version(1)))
            .await,
        Err(Error::Conflict(_))
    ));

    // Unconditional writes bump the version.
    let any = s
        .meta_put(Put::new("schedules", "nightly", &v1))
        .await
        .unwrap();
    assert_eq!(any.version, 3);

    // Deletes: a stale version is refused, the right one deletes, a second delete finds none.
    assert!(matches!(
        s.meta_delete("schedules", "nightly", Expect::Version(2))
            .await,
        Err(Error::Conflict(_))
    ));
    assert!(
        s.meta_delete("schedules", "nightly", Expect::Version(3))
            .await
            .unwrap()
    );
    assert!(
        !s.meta_delete("schedules", "nightly", Expect::Any)
            .await
            .unwrap()
    );
    assert!(s.meta_get("schedules", "nightly").await.unwrap().is_none());
    // Re-created after delete: version 1 again.
    let again = s
        .meta_put(Put::new("schedules", "nightly", &v1).expect(Expect::Absent))
        .await
        .unwrap();
    assert_eq!(again.version, 1);

    // Bad names are refused with the field named.
    let err = s.meta_get("bad name", "k").await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { field, .. } if field == "collection"),
        "{err}"
    );
}

async fn concurrent_creators_one_wins(s: Arc<dyn Store>) {
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let v = json!({ "writer": i });
                s.meta_put(Put::new("locks", "leader", &v).expect(Expect::Absent))
                    .await
            })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.version, 1);
                won += 1
            }
            Err(Error::Conflict(_)) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(won, 1);

    // Read-modify-write counters with version checks lose no increment.
    s.meta_put(Put::new("counters", "c", &json!(0)))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                loop {
                    let r = s.meta_get("counters", "c").await.unwrap().unwrap();
                    let next = json!(r.value.as_i64().unwrap() + 1);
                    match s
                        .meta_put(
                            Put::new("counters", "c", &next).expect(Expect::Version(r.version)),
                        )
                        .await
                    {
                        Ok(_) => return,
                        Err(Error::Conflict(_)) => continue,
                        Err(e) => panic!("unexpected error: {e}"),
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let r = s.meta_get("counters", "c").await.unwrap().unwrap();
    assert_eq!(r.value, json!(10));
    assert_eq!(r.version, 11);
}

async fn expiry_hides_then_prunes(s: Arc<dyn Store>) {
    let v = json!({"pid": 1});
    let short = s
        .meta_put(Put::new("workers", "w1", &v).ttl(Duration::from_millis(300)))
        .await
        .unwrap();
    assert!(short.expires_at.is_some());
    s.meta_put(Put::new("workers", "w2", &v).ttl(Duration::from_secs(3600)))
        .await
        .unwrap();
    s.meta_put(Put::new("workers", "w3", &v)).await.unwrap();
    assert!(s.meta_get("workers", "w1").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(s.meta_get("workers", "w1").await.unwrap().is_none());
    let live: Vec<String> = s
        .meta_list("workers", &MetaQuery::default())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.key)
        .collect();
    assert_eq!(live, ["w2", "w3"]);
    // An expired record counts as absent for create-only writes, and restarts at version 1.
    let reborn = s
        .meta_put(
            Put::new("workers", "w1", &v)
                .expect(Expect::Absent)
                .ttl(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    assert_eq!(reborn.version, 1);
    // Refreshing without a TTL makes it permanent; pruning later removes nothing live.
    s.meta_put(Put::new("workers", "w1", &v)).await.unwrap();
    s.meta_put(Put::new("workers", "w4", &v).ttl(Duration::from_millis(1)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let pruned = s.meta_prune(Utc::now(), 100).await.unwrap();
    assert_eq!(pruned, 1, "only w4 had expired");
    let live = s.meta_list("workers", &MetaQuery::default()).await.unwrap();
    assert_eq!(live.len(), 3);
    assert!(live.iter().all(|r| r.key != "w4"));
}

async fn listing_pages_in_key_order(s: Arc<dyn Store>) {
    for i in 0..25 {
        let key = format!("k{i:02}");
        s.meta_put(Put::new("audit", &key, &json!(i)))
            .await
            .unwrap();
    }
    s.meta_put(Put::new("audit", "other", &json!("x")))
        .await
        .unwrap();
    s.meta_put(Put::new("other-collection", "k00", &json!("y")))
        .await
        .unwrap();

    // Ascending pages with a prefix.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = s
            .meta_list(
                "audit",
                &MetaQuery {
                    prefix: Some("k".into()),
                    after: after.clone(),
                    limit: 10,
                    descending: false,
                },
            )
            .await
            .unwrap();
        after = page.last().map(|r| r.key.clone());
        let n = page.len();
        seen.extend(page.into_iter().map(|r| r.key));
        if n < 10 {
            break;
        }
    }
    let want: Vec<String> = (0..25).map(|i| format!("k{i:02}")).collect();
    assert_eq!(seen, want);

    // Descending from a cursor.
    let page = s
        .meta_list(
            "audit",
            &MetaQuery {
                prefix: Some("k".into()),
                after: Some("k10".into()),
                limit: 3,
                descending: true,
            },
        )
        .await
        .unwrap();
    let keys: Vec<_> = page.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["k09", "k08", "k07"]);

    // Whole collection, newest key first.
    let all = s
        .meta_list(
            "audit",
            &MetaQuery {
                descending: true,
                limit: 1000,
                ..MetaQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(all.len(), 26);
    assert_eq!(all[0].key, "other");
    assert_eq!(all[0].value, json!("x"));

    // A limit out of range is refused.
    let err = s
        .meta_list(
            "audit",
            &MetaQuery {
                limit: 0,
                ..MetaQuery::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::InvalidInput { field, .. } if field == "limit"));
}

async fn token_bucket_is_shared(s: Arc<dyn Store>) {
    let limit = RateLimit {
        per_second: 10.0,
        burst: 5.0,
    };
    let t0 = Utc::now();
    // Burst of five from a full bucket, then refused with a retry-after of one refill.
    for i in 0..5 {
        let take = s.take_tokens("key:abc", limit, 1.0, t0).await.unwrap();
        assert!(take.allowed, "take {i}");
    }
    let refused = s.take_tokens("key:abc", limit, 1.0, t0).await.unwrap();
    assert!(!refused.allowed);
    assert!(
        (refused.retry_after.as_secs_f64() - 0.1).abs() < 0.01,
        "{:?}",
        refused.retry_after
    );
    // 250 ms later, two tokens have come back (2.5, floored by use).
    let t1 = t0 + chrono::Duration::milliseconds(250);
    assert!(
        s.take_tokens("key:abc", limit, 1.0, t1)
            .await
            .unwrap()
            .allowed
    );
    assert!(
        s.take_tokens("key:abc", limit, 1.0, t1)
            .await
            .unwrap()
            .allowed
    );
    assert!(
        !s.take_tokens("key:abc", limit, 1.0, t1)
            .await
            .unwrap()
            .allowed
    );
    // Another bucket is independent.
    assert!(
        s.take_tokens("key:xyz", limit, 5.0, t1)
            .await
            .unwrap()
            .allowed
    );

    // Many concurrent takers at one instant: exactly `burst` succeed.
    let t2 = t1 + chrono::Duration::seconds(10);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.take_tokens("key:race", limit, 1.0, t2).await.unwrap() })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.unwrap().allowed as usize;
    }
    assert_eq!(allowed, 5);

    // Bad settings are refused.
    let err = s
        .take_tokens(
            "b",
            RateLimit {
                per_second: 0.0,
                burst: 1.0,
            },
            1.0,
            t2,
        )
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::InvalidInput { field, .. } if field == "per_second"));
}

async fn batched_writes(s: Arc<dyn Store>) {
    s.meta_put(Put::new("log", "a", &json!("old")))
        .await
        .unwrap();
    let values: Vec<serde_json::Value> = (0..50).map(|i| json!({ "n": i })).collect();
    let keys: Vec<String> = (0..50)
        .map(|i| {
            if i == 0 {
                "a".to_string()
            } else {
                format!("k{i:02}")
            }
        })
        .collect();
    let mut puts: Vec<Put<'_>> = keys
        .iter()
        .zip(&values)
        .map(|(k, v)| Put::new("log", k, v).ttl(Duration::from_secs(3600)))
        .collect();
    // The same key in another collection is a different record.
    let other = json!("other");
    puts.push(Put::new("log2", "a", &other));
    let written = s.meta_put_many(&puts).await.unwrap();
    assert_eq!(written.len(), 51);
    assert_eq!(written[0].version, 2, "an existing record is overwritten");
    assert!(written[1..].iter().all(|r| r.version == 1));
    assert!(written[0].expires_at.is_some());
    assert_eq!(
        s.meta_get("log", "a").await.unwrap().unwrap().value,
        json!({"n": 0})
    );
    assert_eq!(s.meta_get("log2", "a").await.unwrap().unwrap().value, other);
    let all = s
        .meta_list(
            "log",
            &MetaQuery {
                limit: 1000,
                ..MetaQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(all.len(), 50);
    // Conditional writes in a batch keep their conditions.
    let v = json!(1);
    let err = s
        .meta_put_many(&[
            Put::new("log", "fresh", &v).expect(Expect::Absent),
            Put::new("log", "a", &v).expect(Expect::Absent),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
}

backend_tests!(
    batched_writes,
    versions_and_preconditions,
    concurrent_creators_one_wins,
    expiry_hides_then_prunes,
    listing_pages_in_key_order,
    token_bucket_is_shared,
);
