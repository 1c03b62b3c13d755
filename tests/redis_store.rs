//! The Redis store against a real, private `redis-server` (never port 6379): the shared
//! conformance suite (one store, and two instances of one), lease exclusivity between two
//! instances, behaviour while Redis is down and after it comes back, durability across a Redis
//! crash, and the `WAIT` replica check.
//!
//! Each test starts its own server (see `tests/common/redis_server.rs`); without a
//! `redis-server` binary the tests print a loud SKIPPED notice, or fail when `CI` is set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{RedisOptions, RedisServer};
use outpost::config::{Backend, StoreConfig};
use outpost::store::conformance::{self, record};
use outpost::store::redis::RedisStore;
use outpost::store::{
    Coordination, Enqueued, MutationStatus, Queue, ResponseStore, Store, StoreError, now_ms,
};

fn config(redis: &RedisServer) -> StoreConfig {
    StoreConfig {
        backend: Backend::Redis,
        redis_url: redis.url(),
        redis_key_prefix: "outpost-test".into(),
        ..StoreConfig::default()
    }
}

async fn connect(config: &StoreConfig) -> RedisStore {
    RedisStore::connect(config, 1 << 20)
        .await
        .expect("connect to the test redis")
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn redis_store_passes_the_conformance_suite() {
    let redis = RedisServer::start();
    let store = connect(&config(&redis)).await;
    conformance::run_all(Arc::new(store)).await;
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn two_redis_stores_pass_the_shared_coordination_suite() {
    let redis = RedisServer::start();
    let cfg = config(&redis);
    let (a, b) = (connect(&cfg).await, connect(&cfg).await);
    conformance::coordination::shared_between(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_one_instance_holds_a_partition_lease_and_stale_tokens_are_refused() {
    let redis = RedisServer::start();
    let mut cfg = config(&redis);
    cfg.redis_lease = Duration::from_millis(500);
    let a = connect(&cfg).await;
    let b = connect(&cfg).await;
    a.enqueue(record("m1", "p")).await.expect("enqueue");

    let lease_a = a
        .acquire("p")
        .await
        .expect("acquire")
        .expect("a gets the lease");
    assert!(
        b.acquire("p").await.expect("acquire").is_none(),
        "b must wait"
    );
    assert!(a.renew(&lease_a).await.expect("renew"));

    // Released: b takes over; a's old token is now stale.
    a.release(&lease_a).await.expect("release");
    let lease_b = b
        .acquire("p")
        .await
        .expect("acquire")
        .expect("b gets it after release");
    assert!(lease_b.token > lease_a.token, "fencing tokens increase");
    assert!(a.acquire("p").await.expect("acquire").is_none());
    assert!(
        !a.renew(&lease_a).await.expect("renew"),
        "a's lease is gone"
    );

    let mut item = a.peek("p", 1).await.expect("peek").remove(0);
    item.attempts = 7;
    match a.update(&lease_a, &item).await {
        Err(StoreError::LeaseLost { partition }) => assert_eq!(partition, "p"),
        other => panic!("update with a stale token must be refused, got {other:?}"),
    }
    item.status = MutationStatus::Succeeded;
    item.finished_at_ms = Some(now_ms());
    assert!(
        matches!(
            a.finish(&lease_a, &item).await,
            Err(StoreError::LeaseLost { .. })
        ),
        "finish with a stale token must be refused"
    );
    let still = b.peek("p", 1).await.expect("peek");
    assert_eq!((still[0].key.as_str(), still[0].attempts), ("m1", 0));
    assert_eq!(still[0].status, MutationStatus::Queued);

    // b "dies" without releasing: its lease expires and a takes over.
    let started = Instant::now();
    let lease_a2 = loop {
        if let Some(lease) = a.acquire("p").await.expect("acquire") {
            break lease;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the lease of a dead holder must expire"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "not before it expires"
    );
    assert!(!b.renew(&lease_b).await.expect("renew"));
    assert!(matches!(
        b.finish(&lease_b, &item).await,
        Err(StoreError::LeaseLost { .. })
    ));
    // Acquiring again from the same instance supersedes its earlier lease.
    let lease_a3 = a.acquire("p").await.expect("acquire").expect("reentrant");
    assert!(!a.renew(&lease_a2).await.expect("renew"), "superseded");
    assert!(b.acquire("p").await.expect("acquire").is_none());
    // The current holder can finish it.
    a.finish(&lease_a3, &item).await.expect("finish");
    assert!(!b.partition_has_pending("p").await.expect("pending"));
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn unreachable_redis_fails_fast_and_the_same_store_recovers_after_restart() {
    let mut redis = RedisServer::start();
    let store = connect(&config(&redis)).await;
    store.enqueue(record("before", "p")).await.expect("enqueue");

    redis.stop();
    let started = Instant::now();
    let result = store.enqueue(record("during", "p")).await;
    assert!(
        result.is_err(),
        "enqueue without redis must fail: {result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "failed after {:?}, expected a quick failure",
        started.elapsed()
    );
    let started = Instant::now();
    assert!(store.mutation("before").await.is_err());
    assert!(started.elapsed() < Duration::from_secs(6));

    redis.restart();
    // No reconstruction: the same store reconnects by itself.
    let started = Instant::now();
    let accepted = loop {
        match store.enqueue(record("after", "p")).await {
            Ok(answer) => break answer,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "store did not recover after redis restarted: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(
        matches!(accepted, Enqueued::Accepted { .. }),
        "{accepted:?}"
    );
    let keys: Vec<String> = store
        .peek("p", 10)
        .await
        .expect("peek")
        .into_iter()
        .map(|r| r.key)
        .collect();
    assert_eq!(keys, ["before", "after"]);
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_redis_makes_calls_fail_within_seconds_not_hang() {
    let redis = RedisServer::start_with(RedisOptions {
        extra_args: vec!["--enable-debug-command".into(), "yes".into()],
        ..RedisOptions::default()
    });
    let store = connect(&config(&redis)).await;
    store.enqueue(record("before", "p")).await.expect("enqueue");
    // Redis stops answering anyone for 6 s (like a stalled host), without closing sockets.
    let client = redis::Client::open(redis.url()).expect("client");
    let mut raw = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let sleeper = tokio::spawn(async move {
        let _: redis::RedisResult<()> = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(6)
            .query_async(&mut raw)
            .await;
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let result = store.enqueue(record("during", "p")).await;
    let took = started.elapsed();
    assert!(result.is_err(), "{result:?}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
    let _ = sleeper.await;
    // Answers flow again on the same store.
    let started = Instant::now();
    while store.mutation("before").await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.enqueue(record("after", "p")).await.expect("enqueue");
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_enqueue_survives_a_redis_crash_with_appendfsync_always() {
    let mut redis = RedisServer::start();
    let store = connect(&config(&redis)).await;
    for i in 0..20 {
        store
            .enqueue(record(&format!("k{i}"), "p"))
            .await
            .expect("enqueue");
    }
    redis.kill9();
    redis.restart();
    let fresh = connect(&config(&redis)).await;
    let items = fresh.peek("p", 100).await.expect("peek");
    assert_eq!(items.len(), 20, "every acknowledged mutation is back");
    assert_eq!(items[19].key, "k19");
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn connect_fails_fast_when_redis_is_down() {
    let mut redis = RedisServer::start();
    let cfg = config(&redis);
    redis.stop();
    let started = Instant::now();
    let result = RedisStore::connect(&cfg, 1 << 20).await;
    let Err(e) = result else {
        panic!("connect must fail while redis is down")
    };
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );
    assert!(e.to_string().contains("cannot connect"), "{e}");
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn too_few_replicas_fail_the_enqueue_with_a_replicas_error() {
    let redis = RedisServer::start();
    let mut cfg = config(&redis);
    cfg.redis_min_replicas = 1;
    cfg.redis_replica_timeout = Duration::from_millis(200);
    let store = connect(&cfg).await;
    match store.enqueue(record("r1", "p")).await {
        Err(StoreError::Replicas { got, wanted }) => assert_eq!((got, wanted), (0, 1)),
        other => panic!("expected a Replicas error, got {other:?}"),
    }
    // Stored on the primary but unconfirmed: a retry with the same key finds it.
    assert!(matches!(
        store.enqueue(record("r1", "p")).await,
        Ok(Enqueued::Existing(_))
    ));
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_enqueues_from_several_instances_keep_one_ordered_queue() {
    let redis = RedisServer::start();
    let cfg = config(&redis);
    let mut stores: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..4 {
        stores.push(Arc::new(connect(&cfg).await));
    }
    // 400 keys, each sent twice from different instances at once.
    let mut tasks = Vec::new();
    for i in 0..800 {
        let store = stores[i % 4].clone();
        tasks.push(tokio::spawn(async move {
            store.enqueue(record(&format!("c{}", i / 2), "hot")).await
        }));
    }
    let mut seqs = HashSet::new();
    let mut existing = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(Enqueued::Accepted { seq }) => assert!(seqs.insert(seq), "duplicate seq {seq}"),
            Ok(Enqueued::Existing(_)) => existing += 1,
            Err(e) => panic!("enqueue failed under contention: {e}"),
        }
    }
    assert_eq!(
        (seqs.len(), existing),
        (400, 400),
        "each key accepted exactly once"
    );
    let items = stores[0].peek("hot", 1000).await.expect("peek");
    assert_eq!(items.len(), 400);
    assert!(
        items.windows(2).all(|w| w[0].seq < w[1].seq),
        "queue order is sequence order"
    );
    assert_eq!(stores[1].stats().await.expect("stats").queue_depth, 400);
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn a_key_used_in_another_partition_returns_the_existing_record() {
    let redis = RedisServer::start();
    let store = connect(&config(&redis)).await;
    let first = store
        .enqueue(record("shared", "we{ir}d"))
        .await
        .expect("enqueue");
    let Enqueued::Accepted { seq } = first else {
        panic!("{first:?}")
    };
    match store
        .enqueue(record("shared", "other"))
        .await
        .expect("enqueue")
    {
        Enqueued::Existing(existing) => {
            assert_eq!(
                (existing.partition.as_str(), existing.seq),
                ("we{ir}d", seq)
            );
        }
        other => panic!("expected the existing record, got {other:?}"),
    }
    assert!(!store.partition_has_pending("other").await.expect("pending"));
    let found = store
        .mutation("shared")
        .await
        .expect("lookup")
        .expect("found");
    assert_eq!(found.partition, "we{ir}d");
    assert_eq!(
        store.pending_partitions().await.expect("partitions"),
        ["we{ir}d"]
    );
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn cache_is_bounded_by_evicting_least_recently_used() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&config(&redis), 3000)
        .await
        .expect("connect");
    let ttl = Duration::from_secs(60);
    // Puts are sent in the background: wait for each before the next, so recency is known.
    for i in 0..3u8 {
        store
            .cache_put(&[i], Bytes::from(vec![i; 1000]), ttl)
            .await
            .expect("put");
        wait_for_entries(&store, u64::from(i) + 1).await;
    }
    // Touch 0 so that 1 is the least recently used.
    assert!(store.cache_get(&[0]).await.expect("get").is_some());
    store
        .cache_put(&[9], Bytes::from(vec![9; 1000]), ttl)
        .await
        .expect("put");
    let started = Instant::now();
    while store.cache_get(&[9]).await.expect("get").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "put of 9 never landed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(store.cache_get(&[0]).await.expect("get").is_some());
    assert!(store.cache_get(&[1]).await.expect("get").is_none());
    let stats = store.stats().await.expect("stats");
    assert_eq!(
        (stats.cache_entries, stats.cache_bytes),
        (3, 3000),
        "{stats:?}"
    );
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn purge_works_after_redis_forgets_its_scripts() {
    let redis = RedisServer::start();
    let store = connect(&config(&redis)).await;
    let mut forwarded = record("f1", "p");
    forwarded.status = MutationStatus::Succeeded;
    forwarded.finished_at_ms = Some(1);
    store.record_forwarded(forwarded).await.expect("record");
    // A Redis restart without persistence of the script cache looks like this.
    let client = redis::Client::open(redis.url()).expect("client");
    let mut raw = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await
        .expect("SCRIPT FLUSH");
    assert_eq!(store.purge_finished(2).await.expect("purge"), 1);
    assert!(store.mutation("f1").await.expect("lookup").is_none());
    let index: Option<String> = redis::cmd("GET")
        .arg("outpost-test:k:f1")
        .query_async(&mut raw)
        .await
        .expect("GET");
    assert_eq!(index, None, "the key index goes with the record");
}

async fn wait_for_entries(store: &RedisStore, n: u64) {
    let started = Instant::now();
    while store.stats().await.expect("stats").cache_entries < n {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "cache put never landed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
