//! Highly available Redis (issue #22): outpost behind Redis Sentinel, with real `redis-server`
//! processes on free loopback ports (one primary, two replicas, three `redis-server --sentinel`
//! with short timeouts) and two real `outpost` processes in front of one idempotent test
//! upstream (`tests/common`).
//!
//! What they prove:
//! - while two outposts take writes steadily, the primary is SIGKILLed and the Sentinels promote
//!   a replica; the outposts follow the new primary by themselves. Meanwhile a write gets a 503,
//!   never a 202 that is then lost: with `store.redis_min_replicas = 1`, every write that got a
//!   202 is applied exactly once after the drain, each writer's writes in the order of their
//!   202s, and no key reaches the upstream twice (no partition replayed by two instances at
//!   once). The 503 window is measured and printed;
//! - the same while the queue is being replayed when the primary dies: replay pauses and
//!   resumes by itself; at most the item in flight is sent again (same key, applied once);
//! - `/status` names the primary in use and counts the failover;
//! - a lease taken before the failover (confirmed by a replica) still holds on the promoted
//!   replica, so no second instance takes the partition; after its release the next token is
//!   larger, and the old lease is fenced off (`LeaseLost`).
//!
//! Without a `redis-server` binary the tests are built as ignored (see `build.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use outpost::config::{Backend, StoreConfig};
use outpost::store::redis::RedisStore;
use outpost::store::{Coordination, Queue, StoreError, conformance};
use serde_json::{Value, json};

/// The master name the Sentinels monitor.
const MASTER: &str = "outpost-test";

/// A `redis-server --sentinel` child process on a free loopback port.
struct Sentinel {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    /// Starts a Sentinel monitoring `primary_port` (quorum 2, down after 1 s, failover
    /// timeout 3 s) and waits until it answers.
    fn start(primary_port: u16) -> Sentinel {
        Sentinel::start_with(primary_port, 2, None)
    }

    /// Like [`Sentinel::start`], with quorum `quorum` and, with `password`, `requirepass`.
    fn start_with(primary_port: u16, quorum: u32, password: Option<&str>) -> Sentinel {
        let dir = temp_dir();
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {MASTER} 127.0.0.1 {primary_port} {quorum}\n\
                 sentinel down-after-milliseconds {MASTER} 1000\n\
                 sentinel failover-timeout {MASTER} 3000\n\
                 sentinel parallel-syncs {MASTER} 2\n{auth}",
                dir = dir.path().display(),
                auth = password.map_or(String::new(), |p| format!("requirepass {p}\n")),
            ),
        )
        .expect("write sentinel.conf");
        let log = std::fs::File::create(dir.path().join("sentinel.log")).expect("sentinel log");
        let child = Command::new(redis_bin("redis-server"))
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn redis-server --sentinel");
        let sentinel = Sentinel {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let auth: Vec<&str> = password.map_or(Vec::new(), |p| vec!["-a", p, "--no-auth-warning"]);
        while cli(port, &[auth.as_slice(), &["PING"]].concat()).trim() != "PONG" {
            assert!(
                Instant::now() < deadline,
                "sentinel on {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sentinel
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port of the primary this Sentinel names.
    fn primary_port(&self) -> Option<u16> {
        let out = cli(self.port, &["SENTINEL", "get-master-addr-by-name", MASTER]);
        out.lines().nth(1).and_then(|p| p.trim().parse().ok())
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `redis-server` or `redis-cli`: next to `REDIS_SERVER_BIN` if set, else from `PATH`.
fn redis_bin(name: &str) -> PathBuf {
    if let Some(bin) = std::env::var_os("REDIS_SERVER_BIN") {
        let bin = PathBuf::from(bin);
        if let Some(dir) = bin.parent() {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from(name)
}

/// Runs `redis-cli -p port args...` and returns its output.
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new(redis_bin("redis-cli"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One primary with two replicas and three Sentinels watching it.
struct SentinelSite {
    servers: Vec<RedisServer>,
    sentinels: Vec<Sentinel>,
}

impl SentinelSite {
    async fn start() -> SentinelSite {
        let primary = RedisServer::start();
        let replica = || {
            RedisServer::start_with(RedisOptions {
                extra_args: vec![
                    "--replicaof".into(),
                    "127.0.0.1".into(),
                    primary.port().to_string(),
                ],
                ..RedisOptions::default()
            })
        };
        let servers = vec![replica(), replica()];
        let servers = std::iter::once(primary).chain(servers).collect::<Vec<_>>();
        let primary_port = servers[0].port();
        // Both replicas in sync before anything depends on them.
        eventually(Duration::from_secs(15), "replicas in sync", || async {
            cli(primary_port, &["INFO", "replication"]).contains("connected_slaves:2")
                && servers[1..].iter().all(|r| {
                    cli(r.port(), &["INFO", "replication"]).contains("master_link_status:up")
                })
        })
        .await;
        let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(primary_port)).collect();
        // Every Sentinel knows the other two and both replicas, so that a failover can start.
        eventually(
            Duration::from_secs(20),
            "sentinels see each other",
            || async {
                sentinels.iter().all(|s| {
                    let info = cli(s.port, &["INFO", "sentinel"]);
                    info.contains("slaves=2,sentinels=3")
                })
            },
        )
        .await;
        SentinelSite { servers, sentinels }
    }

    fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinels.iter().map(Sentinel::addr).collect()
    }
}

/// An outpost on the Sentinel site, with its config file and (unused) data dir.
struct Instance {
    name: &'static str,
    process: OutpostProcess,
    _config_dir: tempfile::TempDir,
    _data_dir: tempfile::TempDir,
}

impl Instance {
    /// An outpost whose `[store]` section is `store` (plus the timeouts every test here uses).
    async fn start(name: &'static str, store: &str, upstream: &Upstream) -> Instance {
        let config_dir = temp_dir();
        let config: PathBuf = config_dir.path().join("outpost.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[store]
backend = "redis"
{store}
redis_min_replicas = 1
redis_replica_timeout = "500ms"
redis_lease = "1s"

[upstream]
connect_timeout = "500ms"
request_timeout = "20s"
probe_interval = "50ms"
probe_interval_max = "500ms"

[replay]
initial_backoff = "100ms"
max_backoff = "1s"
"#
            ),
        )
        .expect("write the config file");
        let data_dir = temp_dir();
        let config_arg = config.display().to_string();
        let process = OutpostProcess::start(
            &["--config", &config_arg, "--upstream", &upstream.url()],
            data_dir.path(),
        )
        .await;
        Instance {
            name,
            process,
            _config_dir: config_dir,
            _data_dir: data_dir,
        }
    }

    async fn status(&self, http: &reqwest::Client) -> Value {
        let url = format!("{}/status", self.process.admin_url());
        let resp = http
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url} on instance {}: {e}", self.name));
        resp.json().await.unwrap_or(Value::Null)
    }
}

/// What one writer saw: keys that got a 202 (in order), and when a write did not.
#[derive(Default)]
struct Outcomes {
    acknowledged: Vec<String>,
    last_acknowledged: Option<Instant>,
    /// The longest time between two 202s (writes held while the client waits out a failover).
    longest_gap: Duration,
    refused: Vec<(Instant, u16)>,
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn sentinel_failover_under_steady_writes_loses_no_acknowledged_write_and_outposts_follow_the_new_primary()
 {
    failover_under_steady_writes(Ha::Sentinel(SentinelSite::start().await), false).await;
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn sentinel_failover_while_the_queue_is_replayed_pauses_replay_and_resumes_it_without_loss() {
    failover_under_steady_writes(Ha::Sentinel(SentinelSite::start().await), true).await;
}

/// The Redis deployment a failover test runs on.
enum Ha {
    /// One primary, two replicas, three Sentinels.
    Sentinel(SentinelSite),
    /// Three primaries with two replicas each.
    Cluster(RedisCluster),
}

impl Ha {
    /// The `[store]` lines that select it.
    fn store_toml(&self) -> String {
        let list = |addrs: Vec<String>| {
            addrs
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Ha::Sentinel(site) => format!(
                "redis_sentinels = [{}]\nredis_sentinel_master = \"{MASTER}\"",
                list(site.sentinel_addrs())
            ),
            // Two nodes suffice: the client finds the others.
            Ha::Cluster(cluster) => format!(
                "redis_cluster_nodes = [{}]",
                list(cluster.addrs()[..2].to_vec())
            ),
        }
    }

    /// SIGKILLs the primary that holds the queue: its port, and its replicas' ports.
    fn kill_primary(&mut self) -> (u16, Vec<u16>) {
        match self {
            Ha::Sentinel(site) => {
                let port = site.servers[0].port();
                site.servers[0].kill9();
                (
                    port,
                    site.servers[1..].iter().map(RedisServer::port).collect(),
                )
            }
            Ha::Cluster(cluster) => {
                let holder = cluster
                    .nodes
                    .iter()
                    .position(|n| {
                        let info = redis_cli(n.port(), &["INFO", "replication"]);
                        info.contains("role:master")
                            && !redis_cli(n.port(), &["KEYS", "outpost:{p:*}:q"])
                                .trim()
                                .is_empty()
                    })
                    .expect("a primary holds the queue");
                let port = cluster.nodes[holder].port();
                let replicas = redis_cli(port, &["INFO", "replication"])
                    .lines()
                    .filter(|l| l.starts_with("slave"))
                    .filter_map(|l| l.split(",port=").nth(1)?.split(',').next()?.parse().ok())
                    .collect();
                cluster.nodes[holder].kill9();
                (port, replicas)
            }
        }
    }

    /// The promoted replica (`127.0.0.1:port`), once one of `replicas` replaced `killed`.
    fn promoted(&self, killed: u16, replicas: &[u16]) -> Option<String> {
        match self {
            Ha::Sentinel(site) => site.sentinels[0]
                .primary_port()
                .filter(|p| *p != killed)
                .map(|p| format!("127.0.0.1:{p}")),
            Ha::Cluster(_) => replicas
                .iter()
                .find(|port| {
                    redis_cli(**port, &["INFO", "replication"]).contains("role:master")
                        && redis_cli(**port, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
                })
                .map(|port| format!("127.0.0.1:{port}")),
        }
    }

    /// What `/status` says of the servers in use (`store_servers`): `primary` among them?
    fn status_names(&self, servers: &Value, primary: &str) -> bool {
        match self {
            Ha::Sentinel(_) => servers["redis_primary"] == primary,
            Ha::Cluster(_) => servers["redis_cluster_primaries"]
                .as_array()
                .is_some_and(|p| p.iter().any(|n| n["addr"] == primary)),
        }
    }
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn cluster_failover_under_steady_writes_loses_no_acknowledged_write_and_outposts_follow_the_promoted_replica()
 {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 2))
        .await
        .expect("start the cluster");
    failover_under_steady_writes(Ha::Cluster(cluster), false).await;
}

/// Two outposts take writes steadily (the upstream down, so they queue); the primary (with a
/// cluster: the one holding the queue) is SIGKILLed. With `replay_during`, the upstream comes
/// back (each answer 30 ms late) just before the kill, so the queue is being replayed when the
/// primary dies.
async fn failover_under_steady_writes(mut site: Ha, replay_during: bool) {
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let store = site.store_toml();
    let a = Instance::start("a", &store, &upstream).await;
    let b = Instance::start("b", &store, &upstream).await;
    let http = client();
    if let Ha::Sentinel(sentinels) = &site {
        let old_primary = sentinels.servers[0].port();
        for instance in [&a, &b] {
            let status = instance.status(&http).await;
            assert_eq!(
                status["store_servers"]["redis_primary"],
                format!("127.0.0.1:{old_primary}"),
                "{status}"
            );
        }
    }

    // Two writers, one per instance, writing steadily until told to stop.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (name, base) in [("a", a.process.url()), ("b", b.process.url())] {
        let stop = stop.clone();
        let http = http.clone();
        writers.push(tokio::spawn(async move {
            let mut o = Outcomes::default();
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("{name}-{n:05}");
                n += 1;
                let resp = http
                    .post(format!("{base}/apply/orders"))
                    .header("idempotency-key", &key)
                    .json(&json!({"writer": name, "n": n}))
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                let status = resp.map(|r| r.status().as_u16()).unwrap_or(0);
                // 202 queued, or 2xx forwarded and applied at once (the queue was empty).
                if (200..300).contains(&status) {
                    o.acknowledged.push(key);
                    if let Some(last) = o.last_acknowledged {
                        o.longest_gap = o.longest_gap.max(last.elapsed());
                    }
                    o.last_acknowledged = Some(Instant::now());
                } else {
                    o.refused.push((Instant::now(), status));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            o
        }));
    }

    tokio::time::sleep(Duration::from_millis(1500)).await;
    if replay_during {
        upstream.script(
            "/apply",
            vec![ScriptedResponse::passthrough().delay(Duration::from_millis(30))],
        );
        upstream.restart().await;
        upstream
            .wait_requests("/apply", 3, Duration::from_secs(10))
            .await;
    }
    let (killed, replicas) = site.kill_primary();
    let killed_at = Instant::now();

    // A replica is promoted (by the Sentinels, or by the cluster's own election).
    let mut new_primary = None;
    eventually(Duration::from_secs(20), "a replica is promoted", || {
        new_primary = site.promoted(killed, &replicas);
        let done = new_primary.is_some();
        async move { done }
    })
    .await;
    let promoted_after = killed_at.elapsed();
    let new_primary = new_primary.expect("promoted");
    // Writes go on until both instances have taken writes again for a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for writer in writers {
        outcomes.push(writer.await.expect("writer"));
    }

    // The 503 window: from the first refused write to the last one.
    let refused: Vec<&(Instant, u16)> = outcomes.iter().flat_map(|o| &o.refused).collect();
    let first = refused.iter().map(|r| r.0).min();
    let last = refused.iter().map(|r| r.0).max();
    let window = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f),
        _ => Duration::ZERO,
    };
    let statuses: HashSet<u16> = refused.iter().map(|r| r.1).collect();
    let acknowledged: Vec<&String> = outcomes.iter().flat_map(|o| &o.acknowledged).collect();
    let kind = match site {
        Ha::Sentinel(_) => "sentinel",
        Ha::Cluster(_) => "cluster",
    };
    let longest_gap = outcomes.iter().map(|o| o.longest_gap).max();
    eprintln!(
        "{kind} failover: promoted {promoted_after:?} after the SIGKILL; {} writes refused \
         (statuses {statuses:?}) over a window of {window:?}; {} acknowledged; longest time \
         without a 202 for one writer {longest_gap:?}",
        refused.len(),
        acknowledged.len()
    );
    assert!(
        statuses.iter().all(|s| *s == 503),
        "a write during the failover gets a 503: {statuses:?}"
    );
    let promoted_at = killed_at + promoted_after;
    for o in &outcomes {
        assert!(
            o.last_acknowledged.is_some_and(|t| t > promoted_at),
            "writes are taken again after the failover, without a restart"
        );
    }

    // Both instances follow the new primary and count the failover.
    for instance in [&a, &b] {
        eventually(
            Duration::from_secs(10),
            "status names the new primary",
            || async {
                let status = instance.status(&http).await;
                site.status_names(&status["store_servers"], &new_primary)
                    && status["store_servers"]["redis_failovers"] == 1
            },
        )
        .await;
        // `/readyz` says the same, and the metrics count the failover.
        let admin = instance.process.admin_url();
        let ready: Value = http
            .get(format!("{admin}/readyz"))
            .send()
            .await
            .expect("readyz")
            .json()
            .await
            .expect("readyz json");
        assert!(
            site.status_names(&ready["store_servers"], &new_primary),
            "{ready}"
        );
        let metrics = http
            .get(format!("{admin}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        assert!(
            metrics.contains("outpost_store_failovers_total 1"),
            "{metrics}"
        );
    }

    // The upstream comes back: everything acknowledged is applied exactly once.
    if !replay_during {
        upstream.restart().await;
    }
    upstream.clear_script("/apply");
    upstream
        .wait_applied(acknowledged.len(), Duration::from_secs(30))
        .await;
    for instance in [&a, &b] {
        eventually(Duration::from_secs(20), "the queue drained", || async {
            instance.status(&http).await["queue_depth"] == 0
        })
        .await;
    }
    let applied = upstream.applied();
    let applied_keys: Vec<&str> = applied.iter().map(|x| x.key.as_str()).collect();
    let mut once: HashMap<&str, usize> = HashMap::new();
    for key in &applied_keys {
        *once.entry(key).or_default() += 1;
    }
    for key in &acknowledged {
        assert_eq!(
            once.get(key.as_str()),
            Some(&1),
            "acknowledged {key} must be applied exactly once"
        );
    }
    // Each writer's writes in the order of their 202s (one partition, FIFO).
    for o in &outcomes {
        let mine: HashSet<&str> = o.acknowledged.iter().map(String::as_str).collect();
        let order: Vec<&str> = applied_keys
            .iter()
            .copied()
            .filter(|k| mine.contains(k))
            .collect();
        let expected: Vec<&str> = o.acknowledged.iter().map(String::as_str).collect();
        assert_eq!(order, expected, "per-partition order");
    }
    // No key reached the upstream twice: never two instances replaying the partition at once.
    let mut sent: HashMap<String, usize> = HashMap::new();
    for request in upstream.requests_to("/apply") {
        if let Some(key) = request.header("idempotency-key") {
            *sent.entry(key.to_owned()).or_default() += 1;
        }
    }
    // When replay was under way, the item each instance had in flight as the primary died may
    // go again (its answer could not be recorded), with its key: the upstream applied it once.
    let twice: Vec<_> = sent.iter().filter(|(_, n)| **n > 1).collect();
    let allowed = if replay_during { 2 } else { 0 };
    eprintln!("keys sent more than once: {twice:?}");
    assert!(twice.len() <= allowed, "sent more than once: {twice:?}");
}

/// A store connected through the Sentinels of `site` (leases of `lease`, one replica must
/// confirm).
async fn sentinel_store(site: &SentinelSite, lease: Duration) -> RedisStore {
    let config = StoreConfig {
        backend: Backend::Redis,
        redis_sentinels: site.sentinel_addrs(),
        redis_sentinel_master: MASTER.to_owned(),
        redis_min_replicas: 1,
        redis_replica_timeout: Duration::from_millis(500),
        redis_lease: lease,
        ..StoreConfig::default()
    };
    RedisStore::connect(&config, 1 << 20)
        .await
        .expect("connect through the sentinels")
}

/// Retries `call` while it fails (the failover window), for up to 15 s.
async fn through_failover<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match call().await {
            Ok(value) => return value,
            Err(e) if Instant::now() < deadline => {
                eprintln!("{what}: {e} (retrying)");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: still failing after the failover: {e}"),
        }
    }
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn a_lease_taken_before_a_failover_holds_on_the_promoted_replica_and_fencing_tokens_keep_increasing()
 {
    let mut site = SentinelSite::start().await;
    let lease = Duration::from_secs(10);
    let a = sentinel_store(&site, lease).await;
    let b = sentinel_store(&site, lease).await;
    a.enqueue(conformance::record("m1", "p"))
        .await
        .expect("enqueue");
    let lease_a = a
        .acquire("p")
        .await
        .expect("acquire")
        .expect("a gets the lease");

    let old_primary = site.servers[0].port();
    site.servers[0].kill9();
    eventually(Duration::from_secs(15), "a replica is promoted", || {
        let moved = site.sentinels[0]
            .primary_port()
            .is_some_and(|p| p != old_primary);
        async move { moved }
    })
    .await;

    // The lease was confirmed by a replica before `acquire` returned: the promoted replica
    // still gives the partition to a, not b.
    let taken = through_failover("b acquires", || b.acquire("p")).await;
    assert!(taken.is_none(), "b must not take a's partition: {taken:?}");
    assert!(
        through_failover("a renews", || a.renew(&lease_a)).await,
        "a's lease survived the failover"
    );

    // Released on the new primary: b takes over with a larger token, and a is fenced off.
    through_failover("a releases", || a.release(&lease_a)).await;
    let lease_b = through_failover("b acquires", || b.acquire("p"))
        .await
        .expect("b gets the partition after the release");
    assert!(
        lease_b.token > lease_a.token,
        "fencing tokens increase across the failover: {} then {}",
        lease_a.token,
        lease_b.token
    );
    let mut head = a.peek("p", 1).await.expect("peek");
    let mut record = head.pop().expect("m1 is still queued");
    record.attempts += 1;
    let stale = a.update(&lease_a, &record).await;
    assert!(
        matches!(stale, Err(StoreError::LeaseLost { .. })),
        "a's stale lease must be refused: {stale:?}"
    );
    let fresh = b.update(&lease_b, &record).await;
    assert!(fresh.is_ok(), "b's lease writes: {fresh:?}");
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn sentinels_with_requirepass_are_asked_with_the_configured_credentials() {
    let primary = RedisServer::start();
    let sentinel = tokio::task::spawn_blocking({
        let port = primary.port();
        move || Sentinel::start_with(port, 1, Some("s3cret"))
    })
    .await
    .expect("start the sentinel");
    let config = |password: &str| StoreConfig {
        backend: Backend::Redis,
        redis_sentinels: vec![sentinel.addr()],
        redis_sentinel_master: MASTER.to_owned(),
        redis_sentinel_password: password.to_owned(),
        ..StoreConfig::default()
    };
    // Without the password the Sentinel refuses to name the primary: outpost cannot start.
    let refused = RedisStore::connect(&config(""), 1 << 20)
        .await
        .expect_err("the sentinel requires a password");
    assert!(
        refused.to_string().to_lowercase().contains("auth"),
        "says why: {refused}"
    );
    let wrong = RedisStore::connect(&config("wrong"), 1 << 20)
        .await
        .expect_err("a wrong password is refused");
    assert!(
        !wrong.to_string().contains("wrong"),
        "no password in errors: {wrong}"
    );
    let store = RedisStore::connect(&config("s3cret"), 1 << 20)
        .await
        .expect("connect with the sentinel's password");
    store
        .enqueue(conformance::record("m1", "p"))
        .await
        .expect("enqueue on the primary the sentinel named");
    let servers = store.servers().expect("servers");
    assert_eq!(
        servers["redis_primary"],
        format!("127.0.0.1:{}", primary.port()),
        "{servers}"
    );
}
