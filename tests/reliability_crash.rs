//! Reliability suite (issue #21.1): crash loops.
//!
//! Steady concurrent write load ([`WriteLoad`]: writers that each send one mutation after the
//! other to their own path, retrying the same key until it is acknowledged) runs against the
//! real `outpost` binary while the upstream is down, and outpost is SIGKILLed at random moments,
//! over and over, and restarted on the same data each time. Then the upstream comes back and the
//! queue drains. The upstream stands for one that IGNORES `Idempotency-Key`: every request it
//! receives counts as an application ([`deliveries`]). The checks:
//!
//! - every write that got a `2xx` is applied exactly once (`lost` 0, `doubled` 0);
//! - each writer's writes are applied in the writer's order (one partition per writer);
//! - the store opens after every kill (outpost listens and `/readyz` is 200) and holds at least
//!   every write acknowledged before the kill (`/status` `queue_depth`, nothing drains meanwhile);
//! - with kills during the drain too, a key is delivered again only when it was in flight at a
//!   kill, at most one per partition and kill (counted as `redelivered`); anything else is a
//!   double.
//!
//! The same with the Redis backend (AOF `appendfsync always`) with `redis-server` itself
//! SIGKILLed inside the loop, and with two outpost instances sharing Redis of which one is
//! killed. CI size: 4 embedded cycles, 2 Redis cycles; `OUTPOST_RELIABILITY_FULL=1`
//! (`tests/reliability/run.sh --full`): 100 and 20. Each test prints its figures as a
//! `RELIABILITY {...}` line ([`reliability::report`]).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::reliability::{self, LoadSpec, Tally, WriteLoad, assert_writer_order, deliveries};
use common::*;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};

/// Writers of the load.
const WRITERS: usize = 8;
/// Paths (partitions, `partition = "path"`) the writers share.
const PARTITIONS: usize = 4;
/// Where the writes go.
const PATH: &str = "/apply/crash";

/// Fast probes and backoff; one partition per path under [`PATH`]; `store` lines added to
/// `[store]`.
fn config(store: &str) -> String {
    format!(
        r#"
[store]
{store}

[upstream]
connect_timeout = "500ms"
request_timeout = "10s"
probe_interval = "50ms"
probe_interval_max = "300ms"

[replay]
initial_backoff = "50ms"
max_backoff = "300ms"

[[route]]
path = "{PATH}/"
partition = "path"
"#
    )
}

/// A seeded random source; the seed is printed so that a failing run can be repeated
/// (`OUTPOST_RELIABILITY_SEED`).
fn rng(test: &str) -> rand::rngs::StdRng {
    let seed = std::env::var("OUTPOST_RELIABILITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(21)
        });
    println!("{test}: seed {seed} (OUTPOST_RELIABILITY_SEED={seed} repeats it)");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// A config file in a temp dir.
fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("outpost.toml");
    std::fs::write(&path, text).expect("write the config file");
    path.display().to_string()
}

/// The admin `/status` document of `process` (`Null` while it does not answer).
async fn status(http: &reqwest::Client, process: &OutpostProcess) -> Value {
    match http
        .get(format!("{}/status", process.admin_url()))
        .send()
        .await
    {
        Ok(resp) => resp.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// Asserts that the restarted `process` opened its store: `/readyz` answers 200 and
/// `/status` counts at least `acked` queued writes (nothing drains while the upstream is
/// down). Waits up to 20 s (Redis may be coming back).
async fn assert_store_holds(http: &reqwest::Client, process: &OutpostProcess, acked: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = http
            .get(format!("{}/readyz", process.admin_url()))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        let doc = status(http, process).await;
        let depth = doc["queue_depth"].as_u64().unwrap_or(0) as usize;
        if ready && depth >= acked {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after a restart the store holds {depth} queued writes, but {acked} were \
             acknowledged before the kill (readyz: {ready}); /status: {doc}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until every acknowledged key was delivered and every instance's queue is empty.
async fn wait_drained(
    http: &reqwest::Client,
    upstream: &Upstream,
    instances: &[&OutpostProcess],
    acked: &[Vec<String>],
    timeout: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let delivered = deliveries(upstream, PATH);
        let missing = acked
            .iter()
            .flatten()
            .filter(|k| !delivered.contains_key(*k))
            .count();
        let mut empty = true;
        for process in instances {
            empty &= status(http, process).await["queue_depth"] == 0;
        }
        if missing == 0 && empty {
            return started.elapsed();
        }
        if started.elapsed() > timeout {
            let mut docs = Vec::new();
            for process in instances {
                docs.push(status(http, process).await);
            }
            panic!(
                "{missing} acknowledged writes not delivered within {timeout:?}; /status: {docs:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writer index of a load key (`{prefix}-{w:02}-{n:06}`).
fn writer_of(key: &str) -> usize {
    key.rsplit('-')
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("not a load key: {key}"))
}

/// How many of a key's extra deliveries were the item in flight at a kill: each pair of
/// consecutive deliveries must straddle a kill (`(start, end)`: from the SIGKILL until the
/// process was reaped; a request the dying process had sent may reach the upstream within
/// it), and each kill may account for one item per partition. `used` holds the (kill,
/// partition) slots already taken.
fn in_flight_at_kills(
    key: &str,
    times: &[Instant],
    kills: &[(Instant, Instant)],
    used: &mut HashSet<(usize, usize)>,
) -> usize {
    let partition = writer_of(key) % PARTITIONS;
    let mut allowed = 0;
    for pair in times.windows(2) {
        let slot = kills
            .iter()
            .position(|(start, end)| pair[0] <= *end && *start <= pair[1])
            .map(|kill| (kill, partition));
        match slot {
            Some(slot) if used.insert(slot) => allowed += 1,
            _ => {}
        }
    }
    allowed
}

/// Waits until `n` more deliveries than `base` arrived at the upstream (or everything is
/// delivered); false if the drain ended first.
async fn wait_deliveries(upstream: &Upstream, at_least: usize, total: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let delivered = deliveries(upstream, PATH);
        if delivered.len() >= total {
            return false;
        }
        if upstream.requests_to(PATH).len() >= at_least {
            return true;
        }
        assert!(
            Instant::now() < deadline,
            "the drain stalled at {} deliveries",
            delivered.len()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A random stretch of load between two kills.
fn load_stretch(rng: &mut rand::rngs::StdRng) -> Duration {
    Duration::from_millis(rng.random_range(80..400))
}

/// Asserts the tally: nothing lost or doubled, no unknown key, writer order kept.
fn assert_tally(
    what: &str,
    tally: &Tally,
    acked: &[Vec<String>],
    delivered: &HashMap<String, Vec<Instant>>,
) {
    println!("{what}: {tally:?}");
    assert!(tally.acknowledged > 0, "{what}: no write was acknowledged");
    assert_eq!(tally.lost, 0, "{what}: acknowledged writes lost: {tally:?}");
    assert_eq!(tally.doubled, 0, "{what}: writes applied twice: {tally:?}");
    assert_eq!(
        tally.unknown, 0,
        "{what}: unknown keys delivered: {tally:?}"
    );
    assert_writer_order(acked, delivered);
}

// ---------------------------------------------------------------------------------------------
// Embedded store
// ---------------------------------------------------------------------------------------------

/// The embedded crash loop: `cycles` SIGKILLs under load with the upstream down, then the
/// drain with `drain_kills` SIGKILLs during it. Returns the tally, the kills during the drain,
/// the re-deliveries allowed and the drain time.
async fn embedded_loop(name: &str, cycles: usize, drain_kills: usize) {
    let mut rng = rng(name);
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let dirs = (temp_dir(), temp_dir());
    let config = write_config(dirs.0.path(), &config(""));
    let url = upstream.url();
    let mut outpost = OutpostProcess::start(
        &["--config", &config, "--upstream", &url],
        &dirs.1.path().join("data"),
    )
    .await;
    let http = client();
    let load = WriteLoad::start(
        &http,
        LoadSpec {
            writers: WRITERS,
            targets: vec![outpost.url()],
            path: PATH.to_owned(),
            partitions: PARTITIONS,
            key_prefix: "emb".to_owned(),
            pace: Duration::from_millis(5),
        },
    );
    let started = Instant::now();
    for cycle in 0..cycles {
        tokio::time::sleep(load_stretch(&mut rng)).await;
        let acked_before = load.acked_count();
        outpost.kill9().await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..50))).await;
        outpost.restart().await;
        assert_store_holds(&http, &outpost, acked_before).await;
        if cycle % 10 == 9 {
            println!(
                "{name}: {} kills, {} acknowledged",
                cycle + 1,
                load.acked_count()
            );
        }
    }
    tokio::time::sleep(load_stretch(&mut rng)).await;
    let retries = load.retries();
    let unexpected = load.unexpected();
    let (acked, attempted) = load.stop().await;
    assert!(unexpected.is_empty(), "unexpected answers: {unexpected:?}");
    let load_secs = started.elapsed().as_secs_f64();
    let total: usize = acked.iter().map(Vec::len).sum();

    // The upstream comes back; kill during the drain at spread-out moments.
    upstream.restart().await;
    let drain_started = Instant::now();
    let mut kills = Vec::new();
    for i in 0..drain_kills {
        let at = total * (i + 1) / (drain_kills + 1) + rng.random_range(0..=total / 20);
        if !wait_deliveries(&upstream, at, total).await {
            break;
        }
        let start = Instant::now();
        outpost.kill9().await;
        kills.push((start, Instant::now()));
        outpost.restart().await;
    }
    let timeout = Duration::from_secs(if reliability::full() { 600 } else { 60 });
    let drain = wait_drained(&http, &upstream, &[&outpost], &acked, timeout).await;
    let _ = drain_started;
    let delivered = deliveries(&upstream, PATH);
    let mut used = HashSet::new();
    let tally = Tally::count(&acked, &attempted, &delivered, |key, times| {
        in_flight_at_kills(key, times, &kills, &mut used)
    });
    assert_tally(name, &tally, &acked, &delivered);
    assert!(
        tally.redelivered <= kills.len() * PARTITIONS,
        "{name}: {} re-deliveries after {} drain kills of {PARTITIONS} partitions",
        tally.redelivered,
        kills.len()
    );
    reliability::report(
        "crash",
        name,
        reliability::merge(
            tally.fields(),
            json!({
                "backend": "embedded",
                "cycles": cycles,
                "drain_kills": kills.len(),
                "partitions": PARTITIONS,
                "writers": WRITERS,
                "retried_attempts": retries,
                "load_s": (load_secs * 10.0).round() / 10.0,
                "drain_ms": drain.as_millis() as u64,
            }),
        ),
    );
}

/// #21.1: SIGKILL under load with the upstream down, N times, then a clean drain: every
/// acknowledged write applied exactly once (nothing in flight at any kill, so no re-delivery
/// at all), in each writer's order; the store opens every time with every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_sigkills_under_load_lose_and_double_nothing() {
    embedded_loop("embedded kill under load", reliability::size(4, 100), 0).await;
}

/// #21.1: SIGKILLs under load, then SIGKILLs during the drain too: a key is sent again only
/// when it was in flight at a kill, at most one per partition and kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_sigkills_under_load_and_during_the_drain_resend_only_items_in_flight() {
    embedded_loop(
        "embedded kill under load and during drain",
        reliability::size(2, 20),
        reliability::size(2, 10),
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Redis store
// ---------------------------------------------------------------------------------------------

/// One outpost on `redis` in front of `upstream` (data dir unused by the Redis backend).
async fn redis_instance(
    redis: &RedisServer,
    upstream: &Upstream,
    dirs: &(tempfile::TempDir, tempfile::TempDir),
    name: &str,
) -> OutpostProcess {
    let config = write_config(dirs.0.path(), &config(r#"redis_lease = "1s""#));
    let (redis_url, url) = (redis.url(), upstream.url());
    OutpostProcess::start(
        &[
            "--config",
            &config,
            "--redis",
            &redis_url,
            "--upstream",
            &url,
        ],
        &dirs.1.path().join(name),
    )
    .await
}

/// #21.1 with the Redis backend: each cycle SIGKILLs outpost at a random moment under load
/// (restarted at once), then SIGKILLs `redis-server` (AOF `appendfsync always`) at another and
/// restarts it: writes get `503` while Redis is down and are retried; every acknowledged write
/// survives both kinds of crash and is applied exactly once, in each writer's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
async fn redis_sigkills_of_outpost_and_of_redis_under_load_lose_and_double_nothing() {
    let name = "redis: outpost and redis-server killed under load";
    let cycles = reliability::size(2, 20);
    let mut rng = rng(name);
    let mut redis = RedisServer::start();
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let dirs = (temp_dir(), temp_dir());
    let mut outpost = redis_instance(&redis, &upstream, &dirs, "a").await;
    let http = client();
    let load = WriteLoad::start(
        &http,
        LoadSpec {
            writers: WRITERS,
            targets: vec![outpost.url()],
            path: PATH.to_owned(),
            partitions: PARTITIONS,
            key_prefix: "red".to_owned(),
            pace: Duration::from_millis(5),
        },
    );
    let started = Instant::now();
    for _ in 0..cycles {
        tokio::time::sleep(load_stretch(&mut rng)).await;
        let acked_before = load.acked_count();
        outpost.kill9().await;
        outpost.restart().await;
        assert_store_holds(&http, &outpost, acked_before).await;

        tokio::time::sleep(load_stretch(&mut rng)).await;
        let acked_before = load.acked_count();
        redis.kill9();
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..300))).await;
        redis.restart();
        assert_store_holds(&http, &outpost, acked_before).await;
    }
    tokio::time::sleep(load_stretch(&mut rng)).await;
    let retries = load.retries();
    let unexpected = load.unexpected();
    let (acked, attempted) = load.stop().await;
    assert!(unexpected.is_empty(), "unexpected answers: {unexpected:?}");
    let load_secs = started.elapsed().as_secs_f64();

    upstream.restart().await;
    let timeout = Duration::from_secs(if reliability::full() { 600 } else { 60 });
    let drain = wait_drained(&http, &upstream, &[&outpost], &acked, timeout).await;
    let delivered = deliveries(&upstream, PATH);
    // The upstream was down at every kill: nothing was in flight, no re-delivery is allowed.
    let tally = Tally::count(&acked, &attempted, &delivered, |_, _| 0);
    assert_tally(name, &tally, &acked, &delivered);
    reliability::report(
        "crash",
        name,
        reliability::merge(
            tally.fields(),
            json!({
                "backend": "redis",
                "cycles": cycles,
                "outpost_kills": cycles,
                "redis_kills": cycles,
                "partitions": PARTITIONS,
                "writers": WRITERS,
                "retried_attempts": retries,
                "load_s": (load_secs * 10.0).round() / 10.0,
                "drain_ms": drain.as_millis() as u64,
            }),
        ),
    );
}

/// #21.1 with two outpost instances sharing Redis: writers spread over both (a failed attempt
/// goes again, same key, to the other instance); instance A is SIGKILLed under load each cycle
/// and restarted, then once more during the drain (its partition leases expire and B takes
/// over): every acknowledged write applied once, in order; a key sent again only when it was
/// in flight at A's kill, at most one per partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
async fn redis_two_instances_one_sigkilled_under_load_and_during_the_drain_lose_and_double_nothing()
{
    let name = "redis: two instances, one killed under load and during drain";
    let cycles = reliability::size(2, 20);
    let drain_kills = reliability::size(1, 5);
    let mut rng = rng(name);
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let dirs = (temp_dir(), temp_dir());
    let mut a = redis_instance(&redis, &upstream, &dirs, "a").await;
    let b = redis_instance(&redis, &upstream, &dirs, "b").await;
    let http = client();
    let load = WriteLoad::start(
        &http,
        LoadSpec {
            writers: WRITERS,
            targets: vec![a.url(), b.url()],
            path: PATH.to_owned(),
            partitions: PARTITIONS,
            key_prefix: "two".to_owned(),
            pace: Duration::from_millis(5),
        },
    );
    let started = Instant::now();
    for _ in 0..cycles {
        tokio::time::sleep(load_stretch(&mut rng)).await;
        let acked_before = load.acked_count();
        a.kill9().await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
        a.restart().await;
        assert_store_holds(&http, &a, acked_before).await;
        assert_store_holds(&http, &b, acked_before).await;
    }
    tokio::time::sleep(load_stretch(&mut rng)).await;
    let retries = load.retries();
    let unexpected = load.unexpected();
    let (acked, attempted) = load.stop().await;
    assert!(unexpected.is_empty(), "unexpected answers: {unexpected:?}");
    let load_secs = started.elapsed().as_secs_f64();
    let total: usize = acked.iter().map(Vec::len).sum();

    upstream.restart().await;
    let mut kills = Vec::new();
    for i in 0..drain_kills {
        let at = total * (i + 1) / (drain_kills + 1) + rng.random_range(0..=total / 20);
        if !wait_deliveries(&upstream, at, total).await {
            break;
        }
        let start = Instant::now();
        a.kill9().await;
        kills.push((start, Instant::now()));
        a.restart().await;
    }
    let timeout = Duration::from_secs(if reliability::full() { 600 } else { 60 });
    let drain = wait_drained(&http, &upstream, &[&a, &b], &acked, timeout).await;
    let delivered = deliveries(&upstream, PATH);
    let mut used = HashSet::new();
    let tally = Tally::count(&acked, &attempted, &delivered, |key, times| {
        in_flight_at_kills(key, times, &kills, &mut used)
    });
    assert_tally(name, &tally, &acked, &delivered);
    reliability::report(
        "crash",
        name,
        reliability::merge(
            tally.fields(),
            json!({
                "backend": "redis (2 instances)",
                "cycles": cycles,
                "drain_kills": kills.len(),
                "partitions": PARTITIONS,
                "writers": WRITERS,
                "retried_attempts": retries,
                "load_s": (load_secs * 10.0).round() / 10.0,
                "drain_ms": drain.as_millis() as u64,
            }),
        ),
    );
}
