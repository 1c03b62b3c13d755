//! The Redis store on a real Redis Cluster (issue #22, point 4): three primaries made with
//! `redis-cli --cluster create` on free loopback ports (`tests/common/redis_server.rs`).
//!
//! What they prove:
//! - the store passes the shared conformance suite on a cluster (one store, and two instances
//!   of one): every script and command runs within one slot, and cross-slot reads work;
//! - the cache tier spreads over the shards (its buckets hash to different slots);
//! - `store.redis_min_replicas` larger than a shard's replicas is refused at start, naming the
//!   key (by the store, and by `outpost serve`, which exits 1);
//! - a slot migration (one partition's slot moved with `CLUSTER SETSLOT`/`MIGRATE` while the
//!   store is in use) is survived: reads during it follow `ASK`, a write during it waits for its
//!   end (`TRYAGAIN`, retried by the client) and lands, writes after it follow `MOVED`; the
//!   order holds and the partition is replayed from the new node.
//!
//! The failover under steady writes through two outposts is in `tests/redis_ha.rs`
//! (`cluster_failover_under_steady_writes_…`). Without a `redis-server` binary the tests are
//! built as ignored (see `build.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{RedisCluster, redis_cli};
use outpost::config::{Backend, StoreConfig};
use outpost::store::conformance::{self, record};
use outpost::store::redis::RedisStore;
use outpost::store::{Coordination, Queue, ResponseStore, Store};

fn config(cluster: &RedisCluster, prefix: &str) -> StoreConfig {
    StoreConfig {
        backend: Backend::Redis,
        redis_cluster_nodes: cluster.addrs()[..1].to_vec(),
        redis_key_prefix: prefix.into(),
        ..StoreConfig::default()
    }
}

async fn start(primaries: usize, replicas: usize) -> RedisCluster {
    tokio::task::spawn_blocking(move || RedisCluster::start(primaries, replicas))
        .await
        .expect("start the cluster")
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn a_redis_cluster_store_passes_the_conformance_suite_and_spreads_its_cache_over_the_shards()
{
    let cluster = start(3, 0).await;
    let store = RedisStore::connect(&config(&cluster, "outpost-test"), 1 << 20)
        .await
        .expect("connect to the cluster");
    let servers = store.servers().expect("servers");
    assert_eq!(servers["redis_mode"], "cluster", "{servers}");
    assert_eq!(
        servers["redis_cluster_primaries"].as_array().map(Vec::len),
        Some(3),
        "{servers}"
    );
    conformance::run_all(Arc::new(store)).await;
    let cfg = config(&cluster, "outpost-shared");
    let a = RedisStore::connect(&cfg, 1 << 20).await.expect("connect a");
    let b = RedisStore::connect(&cfg, 1 << 20).await.expect("connect b");
    conformance::coordination::shared_between(&a, &b).await;

    // A large budget: many cache buckets, which land on every shard.
    let spread = RedisStore::connect(&config(&cluster, "spread"), 256 << 20)
        .await
        .expect("connect");
    for i in 0..64u32 {
        spread
            .cache_put(
                &i.to_be_bytes(),
                Bytes::from(vec![1; 100]),
                Duration::from_secs(60),
            )
            .await
            .expect("put");
    }
    common::eventually(Duration::from_secs(10), "cache puts landed", || async {
        spread.stats().await.expect("stats").cache_entries == 64
    })
    .await;
    for node in &cluster.nodes {
        let keys = redis_cli(node.port(), &["KEYS", "spread:{c:*}:blob"]);
        assert!(
            !keys.trim().is_empty(),
            "node {} holds cache buckets too",
            node.port()
        );
    }
    for i in 0..64u32 {
        assert!(
            spread
                .cache_get(&i.to_be_bytes())
                .await
                .expect("get")
                .is_some()
        );
    }

    // WAIT for one replica per shard on a cluster without replicas: refused at start.
    let mut strict = config(&cluster, "outpost-test");
    strict.redis_min_replicas = 1;
    let err = RedisStore::connect(&strict, 1 << 20)
        .await
        .expect_err("more replicas than the shards have");
    assert!(
        err.to_string().contains("store.redis_min_replicas"),
        "{err}"
    );
    // The same through the binary: `outpost serve` exits 1 naming the key.
    let dir = common::temp_dir();
    let file = dir.path().join("outpost.toml");
    std::fs::write(
        &file,
        format!(
            "[store]\nbackend = \"redis\"\nredis_cluster_nodes = [\"{}\"]\nredis_min_replicas = 1\n",
            cluster.addrs()[0]
        ),
    )
    .expect("write config");
    let file_arg = file.display().to_string();
    let data_arg = dir.path().display().to_string();
    let listen = format!("127.0.0.1:{}", common::free_port());
    let admin = format!("127.0.0.1:{}", common::free_port());
    let out = tokio::task::spawn_blocking(move || {
        common::run_outpost_timeout(
            &[
                "serve",
                "--config",
                &file_arg,
                "--data-dir",
                &data_arg,
                "--listen",
                &listen,
                "--admin-listen",
                &admin,
                "--upstream",
                "http://127.0.0.1:9",
            ],
            Duration::from_secs(20),
        )
    })
    .await
    .expect("run outpost");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("store.redis_min_replicas"), "{stderr}");
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_migration_is_survived_with_moved_and_ask_and_order_holds() {
    let cluster = start(3, 0).await;
    let store = RedisStore::connect(&config(&cluster, "outpost-test"), 1 << 20)
        .await
        .expect("connect");
    for i in 0..3 {
        store
            .enqueue(record(&format!("m{i}"), "mig"))
            .await
            .expect("enqueue before");
    }
    let queue = "outpost-test:{p:mig}:q";
    let slot = redis_cli(cluster.nodes[0].port(), &["CLUSTER", "KEYSLOT", queue])
        .trim()
        .to_owned();
    let from = cluster.primary_of(queue);
    let to = (from + 1) % 3;
    let (from_port, to_port) = (cluster.nodes[from].port(), cluster.nodes[to].port());
    let (from_id, to_id) = (cluster.id(from), cluster.id(to));
    // Start the migration and move the slot's keys: the slot is now "migrating" on the old node
    // and "importing" on the new one, so the old node answers ASK.
    assert!(
        redis_cli(
            to_port,
            &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]
        )
        .contains("OK")
    );
    assert!(
        redis_cli(
            from_port,
            &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]
        )
        .contains("OK")
    );
    let keys = redis_cli(from_port, &["CLUSTER", "GETKEYSINSLOT", &slot, "1000"]);
    let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
    assert!(keys.len() >= 4, "queue and three records: {keys:?}");
    let mut migrate = vec!["MIGRATE", "127.0.0.1"];
    let to_port_s = to_port.to_string();
    migrate.extend([to_port_s.as_str(), "", "0", "5000", "KEYS"]);
    migrate.extend(keys.iter().copied());
    assert!(redis_cli(from_port, &migrate).contains("OK"), "MIGRATE");
    // Reads of the moved keys follow ASK to the new node.
    let during = store
        .peek("mig", 100)
        .await
        .expect("peek during the migration (ASK)");
    assert_eq!(during.len(), 3);
    // A write needs its new record key and the queue together: Redis answers TRYAGAIN until
    // the migration ends, and the client tries again; it lands once the slot has moved.
    let store = Arc::new(store);
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 3..6 {
                store
                    .enqueue(record(&format!("m{i}"), "mig"))
                    .await
                    .expect("enqueue during the migration lands after it");
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Finish: every primary learns the slot's new owner; the store's map is stale (MOVED).
    for node in 0..3 {
        let port = cluster.nodes[node].port();
        assert!(redis_cli(port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]).contains("OK"));
    }
    writer.await.expect("writer");
    for i in 6..9 {
        store
            .enqueue(record(&format!("m{i}"), "mig"))
            .await
            .expect("enqueue after the migration (MOVED)");
    }
    assert_eq!(
        redis_cli(from_port, &["CLUSTER", "COUNTKEYSINSLOT", &slot]).trim(),
        "0",
        "everything is on the new node"
    );
    let head = store.peek("mig", 100).await.expect("peek");
    let order: Vec<&str> = head.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(
        order,
        (0..9).map(|i| format!("m{i}")).collect::<Vec<_>>(),
        "FIFO order across the migration"
    );
    // Replay from the new node, under a lease.
    let lease = store.acquire("mig").await.expect("acquire").expect("lease");
    for mut item in head {
        item.status = outpost::store::MutationStatus::Succeeded;
        item.finished_at_ms = Some(outpost::store::now_ms());
        store.finish(&lease, &item).await.expect("finish");
    }
    assert!(store.peek("mig", 10).await.expect("peek").is_empty());
    assert!(!store.partition_has_pending("mig").await.expect("pending"));
}
