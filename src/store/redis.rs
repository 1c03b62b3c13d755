//! The Redis backend: several outpost instances share one queue, one set of idempotency records
//! and one durable cache tier, and each partition is replayed by one instance at a time.
//!
//! The design, one file each (each file's docs hold the details):
//! - `redis/keys.rs`, **Keys and slots**: everything about one partition carries its hash tag
//!   `{p:<partition>}`, so every multi-key write is one Lua script over one slot (the scripts are
//!   in `redis/scripts.rs` and `redis/lua/`); the layout is valid on Redis Cluster.
//! - `redis/enqueue.rs`, **Enqueue**: enqueues are written in groups (shared round trips and
//!   fsync); a key is claimed in a global index, then numbered and written with its partition's
//!   queue in one script, so within a partition FIFO order equals acknowledgement order.
//! - `redis/replay.rs`, **Leases**: a partition is replayed under a fenced, expiring lease, checked
//!   inside the same script that saves progress, so an instance that lost its lease
//!   ([`StoreError::LeaseLost`]) never overwrites its successor's work.
//! - `redis/operator.rs`, **Operator actions**: retry, edit and drop take no lease; each is a
//!   compare-and-set of the record, so a late `update` or `finish` of a dropped item changes
//!   nothing.
//! - `redis/housekeeping.rs`, **Housekeeping**: the partition registry and the retention sweep.
//! - `redis/cache.rs`, **Cache**: one script keeps the cache tier within its byte budget.
//! - `redis/primary.rs`, **Connections**: the one primary (`store.redis_url`, or the one the
//!   Sentinels name, followed across failovers); `redis/cluster.rs`, **Redis Cluster**
//!   (`store.redis_cluster_nodes`): the crate's cluster client, cross-slot read pipelines sent
//!   command by command, `WAIT` in one pipeline with each write it confirms.
//! - `redis/credentials.rs`: fresh credentials shared between instances after a 401.
//! - `redis/answers.rs`: Redis's answers read, and the errors made of them.
//!
//! **Durability.** An enqueue is acknowledged only after Redis executed its script. What
//! survives a *Redis* crash depends on Redis's persistence: with `appendonly yes` and
//! `appendfsync always`, Redis fsyncs the AOF before it replies, so an acknowledged mutation
//! survives a crash or power loss of the Redis host: recommended for edge boxes, where the
//! write rate is modest. With `appendfsync everysec` (Redis's default), a Redis crash or power
//! loss may lose up to about one second of acknowledged writes; a plain process restart
//! (`SHUTDOWN`) loses nothing. With `store.redis_min_replicas = n`, an enqueue also waits for
//! `n` replicas to confirm (`WAIT`); when fewer do within `store.redis_replica_timeout`, it
//! fails with [`StoreError::Replicas`] and the app gets a 503. The record is then stored on the
//! primary but not confirmed: it may still be replayed, and a retry with the same idempotency
//! key finds it. `WAIT` runs on a connection of its own so that its blocking never delays other
//! calls. At startup a warning is logged when Redis reports `appendonly no`.
//!
//! **Failures.** [`RedisStore::connect`] fails at once when Redis cannot be reached (outpost
//! exits). Afterwards every command times out after 2 s and every call after 5 s (plus the
//! replica timeout for an enqueue), so an unreachable Redis makes a mutation fail quickly (503)
//! instead of hanging; the connection is re-established by itself when Redis is back. A call
//! that timed out after its script was sent may still be applied when Redis wakes up: the
//! app's retry with the same idempotency key then finds the record (at-least-once, as always).

mod answers;
mod cache;
mod cluster;
mod coalesce;
mod credentials;
mod enqueue;
mod housekeeping;
mod keys;
mod operator;
mod primary;
mod replay;
mod scripts;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::ConnectionManagerConfig;
use redis::{ErrorKind, Value};
use tokio::sync::Semaphore;

use self::answers::{redis_error, timed_out};
use self::cache::CACHE_PUTS_IN_FLIGHT;
use self::cluster::ClusterConn;
use self::enqueue::EnqueueQueue;
use self::keys::Keys;
pub use self::primary::FailoverInfo;
use self::primary::{Conn, PrimaryConn, Sentinels};
use super::{
    CacheStats, Coalesced, Coordination, DeadLetterEdit, Enqueued, Lease, MutationRecord, Queue,
    QueueStats, QueueTotals, ResponseStore, StoreError, codec,
};
use crate::config::StoreConfig;

/// Time allowed for one command's answer, and for establishing a connection.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for one store call (several commands).
const CALL_DEADLINE: Duration = Duration::from_secs(5);

/// The Redis backend (see the module docs for its keys and guarantees).
pub struct RedisStore {
    shared: Arc<Shared>,
    /// Enqueues waiting for the next group write, and whether a writer task is running.
    queue: Arc<std::sync::Mutex<EnqueueQueue>>,
}

/// What every call needs: connections, key names, settings.
struct Shared {
    /// Everything but enqueues: reads, replay progress, leases, cache.
    conn: Conn,
    /// Enqueues and dead-letter retries, followed by `WAIT` when replicas must confirm.
    durable: Conn,
    keys: Keys,
    /// This store's identity in lease values (`<instance>:<token>`).
    instance: String,
    min_replicas: i64,
    replica_timeout: Duration,
    lease_ms: u64,
    cache_budget: u64,
    cache_puts: Arc<Semaphore>,
    /// Cache buckets (hash tags `{c:<n>}`) the cache tier is spread over.
    cache_buckets: u32,
    /// The servers in use and the failovers followed (for `/status`).
    info: Arc<std::sync::Mutex<FailoverInfo>>,
    /// How Redis is deployed.
    mode: Mode,
}

/// How Redis is deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One server at `store.redis_url`.
    Single,
    /// The primary the Sentinels name, followed across failovers.
    Sentinel,
    /// Redis Cluster (`store.redis_cluster_nodes`).
    Cluster,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Single => "single",
            Mode::Sentinel => "sentinel",
            Mode::Cluster => "cluster",
        }
    }
}

/// Refuse `store.redis_min_replicas` above the replicas of some shard: every write there would
/// be answered 503. Checked at start, since only the running cluster knows its replicas.
fn check_cluster_replicas(
    min_replicas: i64,
    topology: &cluster::Topology,
) -> Result<(), StoreError> {
    let fewest = topology.min_replicas().unwrap_or(0);
    if min_replicas > fewest as i64 {
        return Err(redis_error(
            ErrorKind::InvalidClientConfig,
            "store.redis_min_replicas is larger than the cluster's replicas per shard",
            format!(
                "store.redis_min_replicas = {min_replicas}, but a shard has only {fewest} \
                 healthy replica(s): {:?}",
                topology.primaries
            ),
        ));
    }
    Ok(())
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.shared.keys.prefix)
            .field("min_replicas", &self.shared.min_replicas)
            .field("lease_ms", &self.shared.lease_ms)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connect to `config.redis_url`, with `cache_budget` bytes for cache blobs.
    ///
    /// Fails at once (within a few seconds) when Redis cannot be reached or the prefix is
    /// invalid; once connected, the store reconnects by itself when Redis restarts.
    pub async fn connect(
        config: &StoreConfig,
        cache_budget: u64,
    ) -> Result<RedisStore, StoreError> {
        let prefix = config.redis_key_prefix.clone();
        if prefix.contains(['{', '}']) {
            return Err(redis_error(
                ErrorKind::InvalidClientConfig,
                "invalid key prefix",
                format!("store.redis_key_prefix {prefix:?} must not contain '{{' or '}}'"),
            ));
        }
        // WAIT 0 would block forever.
        let replica_timeout = config.redis_replica_timeout.max(Duration::from_millis(1));
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            // One retry per reconnection: a call during an outage fails within seconds, and the
            // next call starts a new reconnection, so a restarted Redis is picked up by itself.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_millis(500));
        let durable_config = manager_config
            .clone()
            .set_response_timeout(Some(COMMAND_TIMEOUT + replica_timeout));
        let info = Arc::new(std::sync::Mutex::new(FailoverInfo::default()));
        let (mut conn, durable, addr) = if !config.redis_cluster_nodes.is_empty() {
            let nodes = &config.redis_cluster_nodes;
            let conn = ClusterConn::open(nodes, COMMAND_TIMEOUT).await?;
            let durable = ClusterConn::open(nodes, COMMAND_TIMEOUT + replica_timeout).await?;
            let topology = conn.topology().await?;
            check_cluster_replicas(config.redis_min_replicas, &topology)?;
            tracing::info!(primaries = ?topology.primaries, "redis cluster: connected");
            if let Ok(mut info) = info.lock() {
                info.cluster_primaries = topology.primaries.clone();
            }
            conn.watch(Arc::downgrade(&info), topology);
            (Conn::Cluster(conn), Conn::Cluster(durable), nodes.join(","))
        } else {
            let (url, addr, sentinels) = if config.redis_sentinels.is_empty() {
                let client = redis::Client::open(config.redis_url.as_str())?;
                let addr = client.get_connection_info().addr().to_string();
                (config.redis_url.clone(), addr, None)
            } else {
                let nonempty = |s: &String| (!s.is_empty()).then(|| s.clone());
                let sentinels = Sentinels {
                    addrs: config.redis_sentinels.clone(),
                    master: config.redis_sentinel_master.clone(),
                    username: nonempty(&config.redis_sentinel_username),
                    password: nonempty(&config.redis_sentinel_password),
                };
                let addr = sentinels.primary().await?;
                (format!("redis://{addr}/"), addr, Some(Arc::new(sentinels)))
            };
            let open = |config: ConnectionManagerConfig| {
                PrimaryConn::open(&url, addr.clone(), config, sentinels.clone(), info.clone())
            };
            let conn = open(manager_config).await?;
            if sentinels.is_some() {
                tracing::info!(primary = %addr, "redis: primary named by the sentinels");
            }
            let durable = open(durable_config).await?;
            (Conn::Primary(conn), Conn::Primary(durable), addr)
        };
        warn_if_not_persistent(&mut conn, &addr).await;
        let keys = Keys { prefix };
        check_layout(&mut conn, &keys).await?;
        let cache_buckets = cache::buckets(&mut conn, &keys, cache_budget).await?;
        let shared = Shared {
            conn,
            durable,
            keys,
            instance: uuid::Uuid::now_v7().simple().to_string(),
            min_replicas: config.redis_min_replicas,
            replica_timeout,
            lease_ms: (config.redis_lease.as_millis() as u64).max(1),
            cache_budget,
            cache_puts: Arc::new(Semaphore::new(CACHE_PUTS_IN_FLIGHT)),
            cache_buckets,
            info,
            mode: if !config.redis_cluster_nodes.is_empty() {
                Mode::Cluster
            } else if !config.redis_sentinels.is_empty() {
                Mode::Sentinel
            } else {
                Mode::Single
            },
        };
        Ok(RedisStore {
            shared: Arc::new(shared),
            queue: Arc::default(),
        })
    }
}

/// Refuse a key prefix written by a newer outpost; mark an unmarked (or older) one with this
/// build's layout version (`codec::REDIS_LAYOUT_VERSION`), deleting the single-slot cache of
/// version 1. `SET NX` first, so that instances starting together agree.
async fn check_layout(conn: &mut Conn, keys: &Keys) -> Result<(), StoreError> {
    let key = keys.layout();
    let _: bool = redis::cmd("SET")
        .arg(&key)
        .arg(codec::REDIS_LAYOUT_VERSION)
        .arg("NX")
        .query_async::<Option<String>>(conn)
        .await?
        .is_some();
    let found: Option<u64> = redis::cmd("GET").arg(&key).query_async(conn).await?;
    let layout = codec::check_layout("redis key prefix", found, codec::REDIS_LAYOUT_VERSION)?;
    if found != Some(layout) {
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(layout)
            .query_async(conn)
            .await?;
    }
    // Version 1's cache (one slot); also what an older instance still running may write there.
    let _: i64 = redis::cmd("DEL")
        .arg(&keys.legacy_cache())
        .query_async(conn)
        .await?;
    Ok(())
}

impl Shared {
    /// Wait for `store.redis_min_replicas` to confirm this connection's writes (one primary).
    /// With a cluster, nothing: there each write carried its own `WAIT`
    /// ([`Self::invoke_confirmed`], [`Self::query_confirmed`]).
    async fn confirm_replicas(&self, conn: &mut Conn) -> Result<(), StoreError> {
        if self.min_replicas <= 0 || self.mode == Mode::Cluster {
            return Ok(());
        }
        let got: i64 = redis::cmd("WAIT")
            .arg(self.min_replicas)
            .arg(self.replica_timeout.as_millis() as u64)
            .query_async(conn)
            .await?;
        if got < self.min_replicas {
            return Err(StoreError::Replicas {
                got,
                wanted: self.min_replicas,
            });
        }
        Ok(())
    }
}

impl Shared {
    /// With a cluster and replicas required, a write is sent in one pipeline with its `WAIT`
    /// (module docs of `cluster.rs`); otherwise alone, confirmed later by
    /// [`Self::confirm_replicas`].
    fn wait_per_write(&self) -> bool {
        self.mode == Mode::Cluster && self.min_replicas > 0
    }

    /// Run a script (keys of one slot); with a cluster and replicas required, followed in the
    /// same pipeline by `WAIT`, failing with [`StoreError::Replicas`] when too few confirm.
    async fn invoke_confirmed<T: redis::FromRedisValue>(
        &self,
        conn: &mut Conn,
        script: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        if !self.wait_per_write() {
            return Ok(script.invoke_async(conn).await?);
        }
        let mut pipe = redis::pipe();
        pipe.invoke_script(script);
        match self.send_with_wait(conn, pipe.clone()).await {
            // A promoted replica, or a restarted node, lacks the scripts: load and send again.
            Err(StoreError::Redis(e))
                if e.kind() == ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                script.load_async(conn).await?;
                self.send_with_wait(conn, pipe).await
            }
            other => other,
        }
    }

    /// Send one command (one slot); with a cluster and replicas required, followed in the same
    /// pipeline by `WAIT` (as [`Self::invoke_confirmed`]).
    async fn query_confirmed<T: redis::FromRedisValue>(
        &self,
        conn: &mut Conn,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        if !self.wait_per_write() {
            return Ok(cmd.query_async(conn).await?);
        }
        let mut pipe = redis::pipe();
        pipe.add_command(cmd.clone());
        self.send_with_wait(conn, pipe).await
    }

    /// `pipe` (one write) plus `WAIT`, on one connection; the write's answer.
    async fn send_with_wait<T: redis::FromRedisValue>(
        &self,
        conn: &mut Conn,
        mut pipe: redis::Pipeline,
    ) -> Result<T, StoreError> {
        pipe.cmd("WAIT")
            .arg(self.min_replicas)
            .arg(self.replica_timeout.as_millis() as u64);
        let (answer, got): (Value, i64) = pipe.query_async(conn).await?;
        if got < self.min_replicas {
            return Err(StoreError::Replicas {
                got,
                wanted: self.min_replicas,
            });
        }
        redis::from_redis_value(answer).map_err(|e| StoreError::Redis(e.into()))
    }
}

#[async_trait]
impl Queue for RedisStore {
    async fn enqueue(&self, record: MutationRecord) -> Result<Enqueued, StoreError> {
        within(
            "enqueue",
            self.shared.replica_timeout,
            self.enqueue_grouped(record),
        )
        .await
    }

    async fn enqueue_coalesced(
        &self,
        record: MutationRecord,
        folded: &MutationRecord,
        tail_seq: u64,
    ) -> Result<Coalesced, StoreError> {
        within(
            "enqueue_coalesced",
            self.shared.replica_timeout,
            self.shared.coalesce_inner(record, folded, tail_seq),
        )
        .await
    }

    async fn peek_tail(
        &self,
        partition: &str,
        limit: usize,
    ) -> Result<Vec<MutationRecord>, StoreError> {
        within(
            "peek_tail",
            Duration::ZERO,
            self.shared.peek_tail_inner(partition, limit),
        )
        .await
    }

    async fn record_forwarded(&self, record: MutationRecord) -> Result<(), StoreError> {
        within(
            "record_forwarded",
            Duration::ZERO,
            self.shared.record_forwarded_inner(record),
        )
        .await
    }

    async fn mutation(&self, key: &str) -> Result<Option<MutationRecord>, StoreError> {
        within("mutation", Duration::ZERO, self.shared.mutation_inner(key)).await
    }

    async fn pending_partitions(&self) -> Result<Vec<String>, StoreError> {
        within(
            "pending_partitions",
            Duration::ZERO,
            self.shared.pending_partitions_inner(),
        )
        .await
    }

    async fn partition_has_pending(&self, partition: &str) -> Result<bool, StoreError> {
        within(
            "partition_has_pending",
            Duration::ZERO,
            self.shared.partition_has_pending_inner(partition),
        )
        .await
    }

    async fn peek(&self, partition: &str, limit: usize) -> Result<Vec<MutationRecord>, StoreError> {
        within(
            "peek",
            Duration::ZERO,
            self.shared.peek_inner(partition, None, limit),
        )
        .await
    }

    async fn peek_after(
        &self,
        partition: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<MutationRecord>, StoreError> {
        within(
            "peek",
            Duration::ZERO,
            self.shared.peek_inner(partition, Some(after), limit),
        )
        .await
    }

    /// Always true: a write that cannot reach Redis fails on its own, within the call deadline.
    fn writable(&self) -> bool {
        true
    }

    async fn update(&self, lease: &Lease, record: &MutationRecord) -> Result<(), StoreError> {
        within(
            "update",
            Duration::ZERO,
            self.shared.update_inner(lease, record),
        )
        .await
    }

    async fn finish(&self, lease: &Lease, record: &MutationRecord) -> Result<(), StoreError> {
        within(
            "finish",
            Duration::ZERO,
            self.shared.finish_inner(lease, record),
        )
        .await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<MutationRecord>, StoreError> {
        within(
            "dead_letters",
            Duration::ZERO,
            self.shared.dead_letters_inner(limit),
        )
        .await
    }

    async fn retry_dead_letter(&self, key: &str) -> Result<bool, StoreError> {
        within(
            "retry_dead_letter",
            self.shared.replica_timeout,
            self.shared.retry_dead_letter_inner(key, None),
        )
        .await
    }

    async fn retry_pending(&self, key: &str) -> Result<bool, StoreError> {
        within(
            "retry_pending",
            self.shared.replica_timeout,
            self.shared.retry_pending_inner(key),
        )
        .await
    }

    async fn drop_mutation(&self, key: &str) -> Result<bool, StoreError> {
        within(
            "drop_mutation",
            self.shared.replica_timeout,
            self.shared.drop_mutation_inner(key, None),
        )
        .await
    }

    async fn edit_dead_letter(&self, key: &str, edit: DeadLetterEdit) -> Result<bool, StoreError> {
        let shared = &self.shared;
        within("edit_dead_letter", shared.replica_timeout, async {
            match edit {
                DeadLetterEdit::Headers(h) => shared.retry_dead_letter_inner(key, Some(h)).await,
                DeadLetterEdit::Superseded(new) => {
                    shared.drop_mutation_inner(key, Some(&new)).await
                }
            }
        })
        .await
    }

    async fn purge_finished(&self, before_ms: u64) -> Result<u64, StoreError> {
        // A sweep may touch many partitions; it is a background job, so give it more time.
        within(
            "purge_finished",
            CALL_DEADLINE * 5,
            self.shared.purge_finished_inner(before_ms),
        )
        .await
    }

    async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        within(
            "queue_stats",
            Duration::ZERO,
            self.shared.queue_stats_inner(),
        )
        .await
    }

    async fn partition_depths(&self) -> Result<Vec<(String, u64)>, StoreError> {
        within(
            "partition_depths",
            Duration::ZERO,
            self.shared.partition_depths_inner(),
        )
        .await
    }

    async fn queued_totals(&self) -> Result<QueueTotals, StoreError> {
        within(
            "queued_totals",
            Duration::ZERO,
            self.shared.queued_totals_inner(),
        )
        .await
    }
}

#[async_trait]
impl ResponseStore for RedisStore {
    async fn cache_get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        within(
            "cache_get",
            Duration::ZERO,
            self.shared.cache_get_inner(key),
        )
        .await
    }

    async fn cache_put(&self, key: &[u8], value: Bytes, ttl: Duration) -> Result<(), StoreError> {
        self.shared.cache_put_in_background(key, value, ttl);
        Ok(())
    }

    async fn cache_stats(&self) -> Result<CacheStats, StoreError> {
        within(
            "cache_stats",
            Duration::ZERO,
            self.shared.cache_stats_inner(),
        )
        .await
    }
}

#[async_trait]
impl Coordination for RedisStore {
    async fn acquire(&self, partition: &str) -> Result<Option<Lease>, StoreError> {
        within(
            "acquire",
            Duration::ZERO,
            self.shared.acquire_inner(partition),
        )
        .await
    }

    async fn renew(&self, lease: &Lease) -> Result<bool, StoreError> {
        within("renew", Duration::ZERO, self.shared.renew_inner(lease)).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        within("release", Duration::ZERO, self.shared.release_inner(lease)).await
    }

    async fn share_credentials(
        &self,
        principal: &str,
        credentials: &[(String, Bytes)],
        at_ms: u64,
    ) -> Result<(), StoreError> {
        within(
            "share_credentials",
            Duration::ZERO,
            self.shared
                .share_credentials_inner(principal, credentials, at_ms),
        )
        .await
    }

    async fn shared_credentials(
        &self,
        principal: &str,
        since_ms: u64,
    ) -> Result<Option<Vec<(String, Bytes)>>, StoreError> {
        within(
            "shared_credentials",
            Duration::ZERO,
            self.shared.shared_credentials_inner(principal, since_ms),
        )
        .await
    }

    async fn announce_waiting(&self, ttl: Duration) -> Result<(), StoreError> {
        within(
            "announce_waiting",
            Duration::ZERO,
            self.shared.announce_waiting_inner(ttl),
        )
        .await
    }

    async fn anyone_waiting(&self) -> Result<bool, StoreError> {
        within(
            "anyone_waiting",
            Duration::ZERO,
            self.shared.anyone_waiting_inner(),
        )
        .await
    }

    fn servers(&self) -> Option<serde_json::Value> {
        let info = match self.shared.info.lock() {
            Ok(info) => info.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let primaries: Vec<serde_json::Value> = info
            .cluster_primaries
            .iter()
            .map(|(addr, replicas)| serde_json::json!({"addr": addr, "replicas": replicas}))
            .collect();
        Some(serde_json::json!({
            "redis_mode": self.shared.mode.name(),
            "redis_primary": (self.shared.mode != Mode::Cluster).then_some(info.primary),
            "redis_cluster_primaries": (self.shared.mode == Mode::Cluster).then_some(primaries),
            "redis_sentinel": self.shared.mode == Mode::Sentinel,
            "redis_failovers": info.failovers,
            "redis_last_failover_at": info.last_failover_ms.map(super::rfc3339_ms),
        }))
    }

    fn failovers(&self) -> u64 {
        match self.shared.info.lock() {
            Ok(info) => info.failovers,
            Err(poisoned) => poisoned.into_inner().failovers,
        }
    }
}

/// Run one store call under [`CALL_DEADLINE`] (plus `extra`).
async fn within<T>(
    what: &'static str,
    extra: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let limit = CALL_DEADLINE + extra;
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(timed_out(what, limit)),
    }
}

/// Log a warning when Redis would lose acknowledged mutations on a crash (best effort:
/// `CONFIG` may be disabled on managed Redis).
async fn warn_if_not_persistent(conn: &mut Conn, addr: &str) {
    let answer: Result<Vec<String>, _> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .query_async(conn)
        .await;
    match answer {
        Ok(pair) if pair.get(1).is_some_and(|v| v == "no") => tracing::warn!(
            redis = addr,
            "redis has appendonly=no: queued mutations may be lost if redis crashes \
             (set appendonly yes, appendfsync always)"
        ),
        Ok(_) => {}
        Err(e) => tracing::debug!(redis = addr, "cannot read redis persistence settings: {e}"),
    }
}
