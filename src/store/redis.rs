//! The Redis backend: several outpost instances share one queue, one set of idempotency records
//! and one durable cache tier, and each partition is replayed by one instance at a time.
//!
//! **Keys.** `P` is `store.redis_key_prefix` (braces are refused, they would move hash slots);
//! `T` is a partition's hash tag `{p:<partition>}` (`%`, `{` and `}` in the name percent-encoded),
//! so everything about one partition lives in one slot:
//!
//! | key                | type   | holds                                                        |
//! |--------------------|--------|--------------------------------------------------------------|
//! | `P:T:m:<key>`      | string | the postcard-encoded [`MutationRecord`] (as in the embedded store) |
//! | `P:T:q`            | zset   | pending keys scored by sequence number: the partition's FIFO  |
//! | `P:T:dead`         | zset   | dead-lettered keys scored by sequence number                   |
//! | `P:T:done`         | zset   | finished keys scored by `finished_at_ms` (retention sweep)     |
//! | `P:T:lease`        | string | `<instance>:<token>` of the replaying instance, with `PX`      |
//! | `P:k:<key>`        | string | key → partition: lookup by idempotency key alone               |
//! | `P:seq`            | string | global acceptance counter (`INCR`)                             |
//! | `P:fence`          | string | lease token counter (`INCR`)                                   |
//! | `P:partitions`     | zset   | partitions holding any state, scored by last registration (ms) |
//! | `P:auth:cred:<principal>` | string | credentials the app offered after a 401 (`*`: anyone's newest), 1 h TTL |
//! | `P:auth:waiting`   | string | present (5 s TTL, renewed) while an instance holds a mutation waiting for them |
//! | `P:{c}:blob` `:exp` `:lru` `:meta` | hash, zset, zset, hash | the durable cache tier    |
//!
//! **Slots.** Every multi-key operation is one Lua script over keys of one slot: enqueue
//! (existence check, FIFO guard, record, queue), update and finish (lease check, record, queue,
//! dead/done list), dead-letter retry, an operator's retry or drop (below), purge of one
//! partition batch, and cache get/put (all cache keys share the `{c}` tag). `P:seq`,
//! `P:fence`, `P:partitions` and `P:k:<key>` are only touched by single-key commands or
//! single-key scripts. The layout is therefore valid on Redis Cluster; this module connects
//! with a standalone client (`ConnectionManager`), so a cluster needs a cluster-aware proxy in
//! front or a cluster client here (a small change: the calls stay the same).
//!
//! **Enqueue.** Enqueues are written in *groups*, like the embedded store's group commit:
//! callers join a waiting list, and one task at a time (per store) writes everything waiting,
//! so concurrent requests share round trips and Redis's fsync. For a group: (1) claim every key
//! (`SET P:k:<key> <partition> NX`, one pipeline). A key another partition owns returns that
//! partition's record (`Existing`); if no record appears there within ~100 ms (an enqueue that
//! died between its steps), the index is taken over with a compare-and-set. (2) Register the
//! group's partitions in `P:partitions`. (3) `INCRBY P:seq n` numbers the records in order.
//! (4) One script per partition, all sent together, returns the existing record for a
//! key whose `P:T:m:<key>` exists (nothing changed) and writes the others to record and queue;
//! it refuses the whole partition's part if the queue already ends with a higher number
//! (another instance numbered and wrote in between), which is then renumbered and sent again.
//! So within a partition FIFO order equals acknowledgement order and sequence numbers increase
//! along it; across partitions numbers are unique and grow with time, but two instances'
//! concurrent enqueues into different partitions may be acknowledged in the opposite order of
//! their numbers. (5) If `store.redis_min_replicas > 0`, one `WAIT n store.redis_replica_timeout`
//! for the group. Callers are answered only then. The group write runs in its own task, so a
//! caller that goes away cannot cut it short for the others; callers that went away before it
//! started are left out.
//!
//! *Cluster caveat:* the key index (step 1) and the record (step 4) are in different slots, so
//! they are not written atomically. Consequences, all narrow: the same idempotency key sent
//! concurrently *for two different partitions* (which is a reused key with another request,
//! answered 422 by the outbox anyway) can, if the first enqueue stalls for more than the
//! takeover delay between its steps, be stored in both partitions; an index can point to a
//! partition without the record (an enqueue that failed after step 1, or a purge interrupted
//! after deleting the index) — lookups then answer "unknown", which is true, and the next
//! enqueue reuses or takes the index over. The same holds on a single Redis, where nothing
//! else differs.
//!
//! **Leases.** `acquire` takes a fencing token (`INCR P:fence`) and stores `<instance>:<token>`
//! in `P:T:lease` with `PX store.redis_lease`, unless another instance's value is there (a
//! script; `<instance>` is a random id per [`RedisStore`]). Acquiring a partition this store
//! already holds succeeds with a fresh token, which supersedes (fences off) the earlier lease.
//! `renew` extends and `release` deletes only while the stored value is ours (scripts). `update`
//! and `finish` check it *inside the same script* that writes, so an instance that was
//! paused past its lease (GC, network partition) and lost the partition gets
//! [`StoreError::LeaseLost`] instead of overwriting its successor's work. A killed instance's
//! lease simply expires after `store.redis_lease` and another instance acquires it. Expiry uses
//! Redis's clock only; instance clocks do not matter.
//!
//! **Operator actions.** `retry_pending` and `drop_mutation` take no lease (the operator is not
//! the replayer). Records are postcard blobs that Lua cannot read, so each is a
//! read-modify-write: `GET` the record, change it in Rust, and write it with a script that
//! applies only if the stored blob is still the one read and the key is still on its queue (or,
//! for a drop, its dead list) with the same sequence number; a changed blob means read again (a
//! few times). A drop moves the key from queue or dead list to `done` (scored by its drop time,
//! so the retention sweep forgets it), with status `rejected` and no request body or headers.
//! The replayer's later `update` or `finish` of a dropped item finds it gone from the queue and
//! changes nothing; after a retry they overwrite the record as usual. Both are confirmed by
//! replicas like an enqueue.
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
//!
//! **Housekeeping.** `purge_finished` deletes finished records older than retention (index
//! first, then record) and forgets partitions that have been empty (no pending, dead or
//! finished items) and unregistered for ten minutes. Every enqueue registers its partition
//! (scored with Redis's clock) *before* writing, and removal is a compare-on-score script, so a
//! partition being written to is not forgotten (only an enqueue stalled ten minutes between
//! registering and writing could be; its call gave up long before).
//!
//! **Cache.** Blobs live in one hash with their expiry and recency in two zsets, all under the
//! `{c}` tag, so one script keeps the byte budget exact: a put reaps a few expired entries,
//! writes, then evicts least recently used entries until the total is within `cache_budget`
//! (the same policy as the embedded store). `cache_entries`/`cache_bytes` are exact counts,
//! including expired entries not yet reaped. Puts are sent in the background (at most 256 at a
//! time; more are dropped, which costs a refetch). The cache tier sits on one cluster shard; it
//! is bounded by the budget, not by Redis's `maxmemory`. Redis must never evict outpost's keys
//! (records, leases): run it with `maxmemory-policy noeviction` and a `maxmemory` above the cache
//! budget plus the expected queue, so that a full Redis refuses writes (503) instead of dropping
//! data.

use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, FromRedisValue, RedisError, Script, Value};
use tokio::sync::{Semaphore, oneshot};

use super::codec::{decode, encode};
use super::{
    CacheStats, Coordination, Enqueued, Lease, MutationRecord, MutationStatus, Queue, QueueStats,
    ResponseStore, StoreError, now_ms,
};
use crate::config::StoreConfig;

/// Time allowed for one command's answer, and for establishing a connection.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for one store call (several commands).
const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// New sequence numbers tried when concurrent enqueues into one partition keep overtaking.
const SEQ_ATTEMPTS: usize = 16;
/// Looks for the record of a key claimed for another partition before taking the claim over.
const CLAIM_ATTEMPTS: usize = 5;
/// Pause between those looks.
const CLAIM_BACKOFF: Duration = Duration::from_millis(25);
/// How long an empty partition stays registered after its last registration.
const PARTITION_IDLE: Duration = Duration::from_secs(600);
/// Cache puts sent in the background at once; more are dropped.
const CACHE_PUTS_IN_FLIGHT: usize = 256;
/// Expired cache entries reaped per put.
const CACHE_REAP: usize = 32;
/// Finished records purged per script call.
const PURGE_BATCH: usize = 256;
/// Reads of a record for an operator's compare-and-set write, when it keeps changing between
/// the read and the write (the replayer saving its progress).
const CAS_ATTEMPTS: usize = 8;

/// `ENQUEUE` KEYS: queue, record 1..n. ARGV: key, seq, blob for each record (seqs increasing).
/// Returns 0 when the first seq is not above the queue's tail (renumber all and try again),
/// else one answer per record: its existing blob (nothing changed) or 1 (stored).
static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local tail = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if tail[2] and tonumber(tail[2]) >= tonumber(ARGV[2]) then return 0 end
local out = {}
for i = 2, #KEYS do
  local a = (i - 2) * 3
  local existing = redis.call('GET', KEYS[i])
  if existing then
    out[#out + 1] = existing
  else
    redis.call('SET', KEYS[i], ARGV[a + 3])
    redis.call('ZADD', KEYS[1], ARGV[a + 2], ARGV[a + 1])
    out[#out + 1] = 1
  end
end
return out
",
    )
});

/// `RECORD_FORWARDED` KEYS: record, done. ARGV: key, finished_at, blob. Returns 1 when stored.
static RECORD_FORWARDED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
",
    )
});

/// `UPDATE` KEYS: lease, record, queue. ARGV: lease value, key, seq, blob.
/// Returns -1 (lease lost), 0 (no longer pending with that seq: unchanged) or 1.
static UPDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local s = redis.call('ZSCORE', KEYS[3], ARGV[2])
if (not s) or tonumber(s) ~= tonumber(ARGV[3]) then return 0 end
redis.call('SET', KEYS[2], ARGV[4])
return 1
",
    )
});

/// `FINISH` KEYS: lease, record, queue, dead-or-done list. ARGV: lease value, key, seq, blob,
/// score.
/// Returns -1 (lease lost), 0 (already finished: unchanged) or 1.
static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local s = redis.call('ZSCORE', KEYS[3], ARGV[2])
if (not s) or tonumber(s) ~= tonumber(ARGV[3]) then return 0 end
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('SET', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[2])
return 1
",
    )
});

/// `RETRY_DEAD` KEYS: record, queue, dead. ARGV: key, old seq, new seq, blob.
/// Returns 1 (queued again), 0 (not a dead letter with that seq) or -2 (seq too low: take another).
static RETRY_DEAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local s = redis.call('ZSCORE', KEYS[3], ARGV[1])
if (not s) or tonumber(s) ~= tonumber(ARGV[2]) then return 0 end
local tail = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
if tail[2] and tonumber(tail[2]) >= tonumber(ARGV[3]) then return -2 end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SET', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
",
    )
});

/// `RETRY_PENDING` KEYS: record, queue. ARGV: key, seq, blob read, new blob.
/// Returns 1 (written), 0 (not pending with that seq: unchanged) or -1 (the record is no longer
/// the blob read: read it again).
static RETRY_PENDING: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[3] then return -1 end
local s = redis.call('ZSCORE', KEYS[2], ARGV[1])
if (not s) or tonumber(s) ~= tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[4])
return 1
",
    )
});

/// `DROP` KEYS: record, queue, dead, done. ARGV: key, seq, blob read, new blob, finished_at.
/// Takes the key out of the queue or the dead list (whichever holds it with that seq), writes
/// the new blob and lists the key as finished. Returns 1 (dropped), 0 (neither pending nor a
/// dead letter: unchanged) or -1 (the record is no longer the blob read: read it again).
static DROP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[3] then return -1 end
local from = nil
for i = 2, 3 do
  local s = redis.call('ZSCORE', KEYS[i], ARGV[1])
  if s and tonumber(s) == tonumber(ARGV[2]) then
    from = KEYS[i]
    break
  end
end
if not from then return 0 end
redis.call('ZREM', from, ARGV[1])
redis.call('SET', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
return 1
",
    )
});

/// How long shared credentials are kept for a waiting mutation (they are tokens: not longer).
const CREDENTIALS_TTL: Duration = Duration::from_secs(3600);

/// `PURGE` KEYS: done, record 1..n. ARGV: before, key 1..n. Returns how many were deleted.
static PURGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = 0
for i = 2, #KEYS do
  local key = ARGV[i]
  local s = redis.call('ZSCORE', KEYS[1], key)
  if s and tonumber(s) < tonumber(ARGV[1]) then
    redis.call('ZREM', KEYS[1], key)
    n = n + redis.call('DEL', KEYS[i])
  end
end
return n
",
    )
});

/// `ACQUIRE` KEYS: lease. ARGV: new value, our owner prefix, ms.
/// Returns 1 when the lease is free or already ours (the new value supersedes the old), else 0.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, #ARGV[2]) ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
",
    )
});

/// `RENEW` KEYS: lease. ARGV: value, ms. Returns 1 while the lease is ours.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
",
    )
});

/// `DELETE_IF` KEYS: key. ARGV: expected value. Deletes the key only if it holds that value.
static DELETE_IF: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
",
    )
});

/// `REPLACE_IF` KEYS: key. ARGV: expected value, new value. Returns 1 when replaced.
static REPLACE_IF: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
",
    )
});

/// Milliseconds on the Redis server's clock (scripts replicate their effects, so this is safe).
const LUA_NOW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// `REGISTER` KEYS: partitions. ARGV: partition. Scores it with the server's time.
static REGISTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_NOW}
redis.call('ZADD', KEYS[1], now, ARGV[1])
return 1
"
    ))
});

/// `FORGET` KEYS: partitions. ARGV: partition, score seen, idle ms.
/// Removes the partition only if nobody registered it since, and only once it is idle.
static FORGET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_NOW}
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not s) or tonumber(s) ~= tonumber(ARGV[2]) then return 0 end
if tonumber(s) > now - tonumber(ARGV[3]) then return 0 end
return redis.call('ZREM', KEYS[1], ARGV[1])
"
    ))
});

/// `CACHE_GET` KEYS: blob, exp, lru, meta. ARGV: member. Returns the blob (and marks it used).
static CACHE_GET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_NOW}
local e = redis.call('ZSCORE', KEYS[2], ARGV[1])
if (not e) or tonumber(e) < now then return false end
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return false end
local tick = redis.call('HINCRBY', KEYS[4], 'tick', 1)
redis.call('ZADD', KEYS[3], tick, ARGV[1])
return v
"
    ))
});

/// `CACHE_PUT` KEYS: blob, exp, lru, meta. ARGV: member, value, ttl ms, budget, reap limit.
static CACHE_PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_NOW}
local function drop(m)
  local len = redis.call('HSTRLEN', KEYS[1], m)
  if redis.call('HDEL', KEYS[1], m) == 1 then
    redis.call('HINCRBY', KEYS[4], 'bytes', -len)
  end
  redis.call('ZREM', KEYS[2], m)
  redis.call('ZREM', KEYS[3], m)
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[5]))
for _, m in ipairs(expired) do drop(m) end
drop(ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[4], 'bytes', string.len(ARGV[2]))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
local tick = redis.call('HINCRBY', KEYS[4], 'tick', 1)
redis.call('ZADD', KEYS[3], tick, ARGV[1])
local budget = tonumber(ARGV[4])
while tonumber(redis.call('HGET', KEYS[4], 'bytes') or '0') > budget do
  local victim = redis.call('ZRANGE', KEYS[3], 0, 0)
  if #victim == 0 then break end
  drop(victim[1])
end
return 1
"
    ))
});

/// Key names (see the module docs for the layout).
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn seq(&self) -> String {
        format!("{}:seq", self.prefix)
    }

    fn fence(&self) -> String {
        format!("{}:fence", self.prefix)
    }

    fn partitions(&self) -> String {
        format!("{}:partitions", self.prefix)
    }

    fn index(&self, key: &str) -> String {
        format!("{}:k:{key}", self.prefix)
    }

    fn partition(&self, partition: &str) -> PartitionKeys {
        PartitionKeys {
            base: format!("{}:{{p:{}}}", self.prefix, escape_tag(partition)),
        }
    }

    /// Fresh credentials shared for a principal (`*`: the newest of anyone's).
    fn credentials(&self, principal: &str) -> String {
        format!("{}:auth:cred:{principal}", self.prefix)
    }

    /// Present while some instance has a mutation waiting for credentials.
    fn auth_waiting(&self) -> String {
        format!("{}:auth:waiting", self.prefix)
    }

    fn cache(&self) -> [String; 4] {
        ["blob", "exp", "lru", "meta"].map(|k| format!("{}:{{c}}:{k}", self.prefix))
    }
}

/// The keys of one partition, all in the slot of its hash tag.
struct PartitionKeys {
    base: String,
}

impl PartitionKeys {
    fn queue(&self) -> String {
        format!("{}:q", self.base)
    }

    fn dead(&self) -> String {
        format!("{}:dead", self.base)
    }

    fn done(&self) -> String {
        format!("{}:done", self.base)
    }

    fn lease(&self) -> String {
        format!("{}:lease", self.base)
    }

    fn record(&self, key: &str) -> String {
        format!("{}:m:{key}", self.base)
    }
}

/// Percent-encode the characters that would end or nest a hash tag (and `%` itself), so that
/// every partition name maps to its own, well-formed tag.
fn escape_tag(partition: &str) -> String {
    let mut out = String::with_capacity(partition.len());
    for c in partition.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    out
}

/// How a key claim ended.
enum Claim {
    /// The key's index points to our partition: its script decides.
    Ours,
    /// Another partition holds a record under this key.
    Existing(Box<MutationRecord>),
}

/// The Redis backend (see the module docs for its keys and guarantees).
pub struct RedisStore {
    shared: Arc<Shared>,
    /// Enqueues waiting for the next group write, and whether a writer task is running.
    queue: Arc<std::sync::Mutex<EnqueueQueue>>,
}

/// The waiting list of enqueues and its writer flag, under one lock.
#[derive(Default)]
struct EnqueueQueue {
    waiting: Vec<Waiting>,
    writer_running: bool,
}

/// Clears the writer flag when the writer task ends, even by a panic, so that the next
/// enqueue starts a new writer instead of waiting forever.
struct WriterRunning {
    queue: Arc<std::sync::Mutex<EnqueueQueue>>,
    /// False once the writer cleared the flag itself.
    armed: bool,
}

impl Drop for WriterRunning {
    fn drop(&mut self) {
        if self.armed
            && let Ok(mut q) = self.queue.lock()
        {
            q.writer_running = false;
        }
    }
}

/// An enqueue waiting for its group write.
struct Waiting {
    record: MutationRecord,
    reply: oneshot::Sender<Result<Enqueued, StoreError>>,
}

/// What every call needs: connections, key names, settings.
struct Shared {
    /// Everything but enqueues: reads, replay progress, leases, cache.
    conn: ConnectionManager,
    /// Enqueues and dead-letter retries, followed by `WAIT` when replicas must confirm.
    durable: ConnectionManager,
    keys: Keys,
    /// This store's identity in lease values (`<instance>:<token>`).
    instance: String,
    min_replicas: i64,
    replica_timeout: Duration,
    lease_ms: u64,
    cache_budget: u64,
    cache_puts: Arc<Semaphore>,
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
        let client = redis::Client::open(config.redis_url.as_str())?;
        let addr = client.get_connection_info().addr().to_string();
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
        let open = |config: ConnectionManagerConfig| {
            let client = client.clone();
            let addr = addr.clone();
            async move {
                match tokio::time::timeout(
                    CALL_DEADLINE,
                    ConnectionManager::new_with_config(client, config),
                )
                .await
                {
                    Ok(Ok(conn)) => Ok(conn),
                    Ok(Err(e)) => Err(redis_error(
                        e.kind(),
                        "cannot connect to redis",
                        format!("{addr}: {e}"),
                    )),
                    Err(_) => Err(redis_error(
                        ErrorKind::Io,
                        "cannot connect to redis",
                        format!("{addr}: no answer within {CALL_DEADLINE:?}"),
                    )),
                }
            }
        };
        let mut conn = open(manager_config).await?;
        let durable = open(durable_config).await?;
        warn_if_not_persistent(&mut conn, &addr).await;
        let shared = Shared {
            conn,
            durable,
            keys: Keys { prefix },
            instance: uuid::Uuid::now_v7().simple().to_string(),
            min_replicas: config.redis_min_replicas,
            replica_timeout,
            lease_ms: (config.redis_lease.as_millis() as u64).max(1),
            cache_budget,
            cache_puts: Arc::new(Semaphore::new(CACHE_PUTS_IN_FLIGHT)),
        };
        Ok(RedisStore {
            shared: Arc::new(shared),
            queue: Arc::default(),
        })
    }

    /// Join the next group write and wait for its answer (module docs, "Enqueue").
    ///
    /// One writer task at a time takes everything waiting, writes it as one group, and goes
    /// on while more is waiting; callers only queue and wait. (A lock that every caller took
    /// in turn made groups of one under load: each caller whose record an earlier group had
    /// already written still held the lock for a round of its own.)
    async fn enqueue_grouped(&self, record: MutationRecord) -> Result<Enqueued, StoreError> {
        let (reply, answer) = oneshot::channel();
        let start_writer = {
            let mut q = self.queue.lock().map_err(|_| StoreError::Closed)?;
            q.waiting.push(Waiting { record, reply });
            !std::mem::replace(&mut q.writer_running, true)
        };
        if start_writer {
            // A task of its own, so that a caller going away (a client disconnect) cannot cut
            // a group write short.
            let shared = self.shared.clone();
            let queue = self.queue.clone();
            tokio::spawn(async move {
                let mut running = WriterRunning {
                    queue: queue.clone(),
                    armed: true,
                };
                loop {
                    let group = match queue.lock() {
                        Ok(mut q) if q.waiting.is_empty() => {
                            // Under the same lock as the callers' check: an enqueue arriving
                            // now sees no writer and starts one.
                            q.writer_running = false;
                            running.armed = false;
                            return;
                        }
                        Ok(mut q) => std::mem::take(&mut q.waiting),
                        Err(_) => return,
                    };
                    shared.write_group(group).await;
                }
            });
        }
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

impl Shared {
    /// What the lease key holds while `lease` is valid.
    fn lease_value(&self, lease: &Lease) -> String {
        format!("{}:{}", self.instance, lease.token)
    }

    /// Make sure `key` is enqueued (or recorded) under `partition` and no other (module docs).
    async fn claim(
        &self,
        conn: &mut ConnectionManager,
        key: &str,
        partition: &str,
    ) -> Result<Claim, StoreError> {
        let index = self.keys.index(key);
        let mut looks = 0;
        loop {
            let set: Value = redis::cmd("SET")
                .arg(&index)
                .arg(partition)
                .arg("NX")
                .query_async(conn)
                .await?;
            if matches!(set, Value::Okay) {
                return Ok(Claim::Ours);
            }
            let owner: Option<String> = redis::cmd("GET").arg(&index).query_async(conn).await?;
            let Some(owner) = owner else {
                continue; // purged meanwhile: claim again
            };
            if owner == partition {
                return Ok(Claim::Ours);
            }
            let record_key = self.keys.partition(&owner).record(key);
            let blob: Option<Vec<u8>> =
                redis::cmd("GET").arg(&record_key).query_async(conn).await?;
            if let Some(blob) = blob {
                return Ok(Claim::Existing(Box::new(decode(&blob)?)));
            }
            looks += 1;
            if looks < CLAIM_ATTEMPTS {
                // Another enqueue may be between its claim and its script.
                tokio::time::sleep(CLAIM_BACKOFF).await;
                continue;
            }
            // It never wrote its record: take the claim over.
            let replaced: i64 = REPLACE_IF
                .key(&index)
                .arg(&owner)
                .arg(partition)
                .invoke_async(conn)
                .await?;
            if replaced == 1 {
                tracing::warn!(key, from = %owner, to = partition, "took over a stale key claim");
                return Ok(Claim::Ours);
            }
            looks = 0;
        }
    }

    /// Note `partition` in the registry (before anything is written to it).
    async fn register(
        &self,
        conn: &mut ConnectionManager,
        partition: &str,
    ) -> Result<(), StoreError> {
        let _: i64 = REGISTER
            .key(self.keys.partitions())
            .arg(partition)
            .invoke_async(conn)
            .await?;
        Ok(())
    }

    /// Every registered partition and its registration time.
    async fn registry(
        &self,
        conn: &mut ConnectionManager,
    ) -> Result<Vec<(String, f64)>, StoreError> {
        let v: Value = redis::cmd("ZRANGE")
            .arg(self.keys.partitions())
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(conn)
            .await?;
        scored(v)
    }

    async fn next_seq(&self, conn: &mut ConnectionManager) -> Result<u64, StoreError> {
        Ok(redis::cmd("INCR")
            .arg(self.keys.seq())
            .query_async(conn)
            .await?)
    }

    /// Wait for `store.redis_min_replicas` to confirm this connection's writes.
    async fn confirm_replicas(&self, conn: &mut ConnectionManager) -> Result<(), StoreError> {
        if self.min_replicas <= 0 {
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

    /// Write one group of enqueues and answer each (module docs, "Enqueue").
    async fn write_group(&self, group: Vec<Waiting>) {
        // Callers that gave up (deadline, client gone) were never acknowledged: skip them.
        let mut rest: Vec<Waiting> = group.into_iter().filter(|w| !w.reply.is_closed()).collect();
        // Rounds of distinct keys, so that a key's claim never waits for its own group.
        while !rest.is_empty() {
            let mut seen = std::collections::HashSet::new();
            let (round, later): (Vec<_>, Vec<_>) = rest
                .into_iter()
                .partition(|w| seen.insert(w.record.key.clone()));
            rest = later;
            let limit = CALL_DEADLINE + self.replica_timeout;
            let (records, replies): (Vec<_>, Vec<_>) =
                round.into_iter().map(|w| (w.record, w.reply)).unzip();
            let n = records.len();
            let answers = match tokio::time::timeout(limit, self.enqueue_round(records)).await {
                Ok(Ok(answers)) => answers,
                Ok(Err(e)) => (0..n).map(|_| Err(copy_error(&e))).collect(),
                Err(_) => (0..n).map(|_| Err(timed_out("enqueue", limit))).collect(),
            };
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        }
    }

    /// Enqueue records with distinct keys; one answer per record, in order.
    async fn enqueue_round(
        &self,
        mut records: Vec<MutationRecord>,
    ) -> Result<Vec<Result<Enqueued, StoreError>>, StoreError> {
        let mut conn = self.durable.clone();
        let mut answers: Vec<Option<Result<Enqueued, StoreError>>> =
            records.iter().map(|_| None).collect();
        // (1) Claim every key: one round trip when none is taken.
        let mut pipe = redis::pipe();
        for r in &records {
            pipe.cmd("SET")
                .arg(self.keys.index(&r.key))
                .arg(&r.partition)
                .arg("NX");
        }
        let claimed: Vec<Value> = pipe.query_async(&mut conn).await?;
        for (i, set) in claimed.iter().enumerate() {
            if matches!(set, Value::Okay) {
                continue;
            }
            let r = &records[i];
            if let Claim::Existing(existing) = self.claim(&mut conn, &r.key, &r.partition).await? {
                answers[i] = Some(Ok(Enqueued::Existing(existing)));
            }
        }
        // (2) Register the partitions before writing to them.
        let mut partitions: Vec<&str> = records.iter().map(|r| r.partition.as_str()).collect();
        partitions.sort_unstable();
        partitions.dedup();
        for p in partitions {
            self.register(&mut conn, p).await?;
        }
        // (3, 4) Number the rest in order and write them, one script per partition; a
        // partition whose queue got a higher number meanwhile (another instance) is renumbered.
        let mut todo: Vec<usize> = (0..records.len())
            .filter(|&i| answers[i].is_none())
            .collect();
        let mut accepted = false;
        for _ in 0..SEQ_ATTEMPTS {
            if todo.is_empty() {
                break;
            }
            let last: u64 = redis::cmd("INCRBY")
                .arg(self.keys.seq())
                .arg(todo.len())
                .query_async(&mut conn)
                .await?;
            let first = last + 1 - todo.len() as u64;
            let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
            for (n, &i) in todo.iter().enumerate() {
                records[i].seq = first + n as u64;
                match groups.iter_mut().find(|(p, _)| *p == records[i].partition) {
                    Some((_, members)) => members.push(i),
                    None => groups.push((records[i].partition.clone(), vec![i])),
                }
            }
            let writes = groups.iter().map(|(partition, members)| {
                let mut conn = conn.clone();
                let records = &records;
                async move {
                    let pk = self.keys.partition(partition);
                    let mut write = ENQUEUE.key(pk.queue());
                    for &i in members {
                        write
                            .key(pk.record(&records[i].key))
                            .arg(&records[i].key)
                            .arg(records[i].seq)
                            .arg(encode(&records[i])?);
                    }
                    let answer: Value = write.invoke_async(&mut conn).await?;
                    Ok::<_, StoreError>(answer)
                }
            });
            // Concurrent on the multiplexed connection: they travel as one pipeline.
            let results = futures_util::future::join_all(writes).await;
            todo.clear();
            for ((partition, members), result) in groups.into_iter().zip(results) {
                match result? {
                    Value::Int(0) => {
                        tracing::debug!(partition, "overtaken by another instance; renumbering");
                        todo.extend(members);
                    }
                    Value::Array(items) if items.len() == members.len() => {
                        for (i, item) in members.into_iter().zip(items) {
                            answers[i] = Some(match item {
                                Value::Int(1) => {
                                    accepted = true;
                                    Ok(Enqueued::Accepted {
                                        seq: records[i].seq,
                                    })
                                }
                                Value::BulkString(blob) => {
                                    decode(&blob).map(|r| Enqueued::Existing(Box::new(r)))
                                }
                                other => Err(unexpected("enqueue", &other)),
                            });
                        }
                    }
                    other => return Err(unexpected("enqueue", &other)),
                }
            }
        }
        // (5) One WAIT for the whole group.
        let replicas = if accepted {
            self.confirm_replicas(&mut conn).await
        } else {
            Ok(())
        };
        Ok(answers
            .into_iter()
            .map(|answer| match (answer, &replicas) {
                (None, _) => Err(redis_error(
                    ErrorKind::Client,
                    "enqueue kept being overtaken",
                    format!("{SEQ_ATTEMPTS} sequence numbers refused"),
                )),
                (Some(Ok(Enqueued::Accepted { .. })), Err(e)) => Err(copy_error(e)),
                (Some(answer), _) => answer,
            })
            .collect())
    }

    async fn record_forwarded_inner(&self, record: MutationRecord) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        if let Claim::Existing(_) = self
            .claim(&mut conn, &record.key, &record.partition)
            .await?
        {
            return Ok(());
        }
        // Registered so that the retention sweep finds its `done` entry.
        self.register(&mut conn, &record.partition).await?;
        let pk = self.keys.partition(&record.partition);
        let at = record.finished_at_ms.unwrap_or_else(now_ms);
        let _: i64 = RECORD_FORWARDED
            .key(pk.record(&record.key))
            .key(pk.done())
            .arg(&record.key)
            .arg(at)
            .arg(encode(&record)?)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn mutation_inner(&self, key: &str) -> Result<Option<MutationRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let partition: Option<String> = redis::cmd("GET")
            .arg(self.keys.index(key))
            .query_async(&mut conn)
            .await?;
        let Some(partition) = partition else {
            return Ok(None);
        };
        let blob: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.keys.partition(&partition).record(key))
            .query_async(&mut conn)
            .await?;
        blob.map(|b| decode(&b)).transpose()
    }

    async fn pending_partitions_inner(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        let registry = self.registry(&mut conn).await?;
        if registry.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (p, _) in &registry {
            pipe.cmd("ZCARD").arg(self.keys.partition(p).queue());
        }
        let counts: Vec<u64> = pipe.query_async(&mut conn).await?;
        Ok(registry
            .into_iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .map(|((p, _), _)| p)
            .collect())
    }

    async fn peek_inner(
        &self,
        partition: &str,
        limit: usize,
    ) -> Result<Vec<MutationRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let pk = self.keys.partition(partition);
        let keys: Vec<String> = redis::cmd("ZRANGE")
            .arg(pk.queue())
            .arg(0)
            .arg(limit as i64 - 1)
            .query_async(&mut conn)
            .await?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let record_keys: Vec<String> = keys.iter().map(|k| pk.record(k)).collect();
        // One slot, so MGET is fine on a cluster too.
        let blobs: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&record_keys)
            .query_async(&mut conn)
            .await?;
        blobs.into_iter().flatten().map(|b| decode(&b)).collect()
    }

    async fn acquire_inner(&self, partition: &str) -> Result<Option<Lease>, StoreError> {
        let mut conn = self.conn.clone();
        let token: u64 = redis::cmd("INCR")
            .arg(self.keys.fence())
            .query_async(&mut conn)
            .await?;
        let lease = Lease {
            partition: partition.to_string(),
            token,
        };
        let taken: i64 = ACQUIRE
            .key(self.keys.partition(partition).lease())
            .arg(self.lease_value(&lease))
            .arg(format!("{}:", self.instance))
            .arg(self.lease_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok((taken == 1).then_some(lease))
    }

    async fn renew_inner(&self, lease: &Lease) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let renewed: i64 = RENEW
            .key(self.keys.partition(&lease.partition).lease())
            .arg(self.lease_value(lease))
            .arg(self.lease_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(renewed == 1)
    }

    async fn release_inner(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = DELETE_IF
            .key(self.keys.partition(&lease.partition).lease())
            .arg(self.lease_value(lease))
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn update_inner(&self, lease: &Lease, record: &MutationRecord) -> Result<(), StoreError> {
        check_lease_partition(lease, record)?;
        let mut conn = self.conn.clone();
        let pk = self.keys.partition(&record.partition);
        let answer: i64 = UPDATE
            .key(pk.lease())
            .key(pk.record(&record.key))
            .key(pk.queue())
            .arg(self.lease_value(lease))
            .arg(&record.key)
            .arg(record.seq)
            .arg(encode(record)?)
            .invoke_async(&mut conn)
            .await?;
        lease_answer(lease, answer)?;
        if answer == 0 {
            return Err(StoreError::NotQueued {
                key: record.key.clone(),
            });
        }
        Ok(())
    }

    async fn finish_inner(&self, lease: &Lease, record: &MutationRecord) -> Result<(), StoreError> {
        check_lease_partition(lease, record)?;
        let mut conn = self.conn.clone();
        let pk = self.keys.partition(&record.partition);
        let (list, score, blob) = if record.status.is_dead_letter() {
            (pk.dead(), record.seq, encode(record)?)
        } else {
            let mut stored = record.clone();
            stored.forget_request();
            let at = record.finished_at_ms.unwrap_or_else(now_ms);
            (pk.done(), at, encode(&stored)?)
        };
        let answer: i64 = FINISH
            .key(pk.lease())
            .key(pk.record(&record.key))
            .key(pk.queue())
            .key(list)
            .arg(self.lease_value(lease))
            .arg(&record.key)
            .arg(record.seq)
            .arg(blob)
            .arg(score)
            .invoke_async(&mut conn)
            .await?;
        lease_answer(lease, answer)
    }

    async fn dead_letters_inner(&self, limit: usize) -> Result<Vec<MutationRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let registry = self.registry(&mut conn).await?;
        if registry.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (p, _) in &registry {
            pipe.cmd("ZRANGE")
                .arg(self.keys.partition(p).dead())
                .arg(0)
                .arg(limit as i64 - 1)
                .arg("WITHSCORES");
        }
        let lists: Vec<Value> = pipe.query_async(&mut conn).await?;
        let mut dead: Vec<(f64, String)> = Vec::new();
        for ((partition, _), list) in registry.iter().zip(lists) {
            let pk = self.keys.partition(partition);
            dead.extend(
                scored(list)?
                    .into_iter()
                    .map(|(k, seq)| (seq, pk.record(&k))),
            );
        }
        dead.sort_by(|a, b| a.0.total_cmp(&b.0));
        dead.truncate(limit);
        if dead.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (_, record_key) in &dead {
            pipe.cmd("GET").arg(record_key);
        }
        let blobs: Vec<Option<Vec<u8>>> = pipe.query_async(&mut conn).await?;
        blobs.into_iter().flatten().map(|b| decode(&b)).collect()
    }

    async fn retry_dead_letter_inner(&self, key: &str) -> Result<bool, StoreError> {
        let mut conn = self.durable.clone();
        let Some(mut record) = self.mutation_inner(key).await? else {
            return Ok(false);
        };
        if !record.status.is_dead_letter() {
            return Ok(false);
        }
        self.register(&mut conn, &record.partition).await?;
        let pk = self.keys.partition(&record.partition);
        let old_seq = record.seq;
        record.status = MutationStatus::Queued;
        record.attempts = 0;
        record.next_attempt_at_ms = 0;
        record.finished_at_ms = None;
        for _ in 0..SEQ_ATTEMPTS {
            let seq = self.next_seq(&mut conn).await?;
            record.seq = seq;
            let answer: i64 = RETRY_DEAD
                .key(pk.record(key))
                .key(pk.queue())
                .key(pk.dead())
                .arg(key)
                .arg(old_seq)
                .arg(seq)
                .arg(encode(&record)?)
                .invoke_async(&mut conn)
                .await?;
            match answer {
                1 => {
                    self.confirm_replicas(&mut conn).await?;
                    return Ok(true);
                }
                0 => return Ok(false),
                -2 => continue,
                other => return Err(unexpected("retry_dead_letter", &Value::Int(other))),
            }
        }
        Err(redis_error(
            ErrorKind::Client,
            "dead-letter retry kept being overtaken",
            format!("partition {:?}", record.partition),
        ))
    }

    /// The partition and stored blob of `key` (for a compare-and-set write).
    async fn raw_record(
        &self,
        conn: &mut ConnectionManager,
        key: &str,
    ) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        let partition: Option<String> = redis::cmd("GET")
            .arg(self.keys.index(key))
            .query_async(conn)
            .await?;
        let Some(partition) = partition else {
            return Ok(None);
        };
        let blob: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.keys.partition(&partition).record(key))
            .query_async(conn)
            .await?;
        Ok(blob.map(|b| (partition, b)))
    }

    /// Operator's "try it now": no lease is taken (the replayer's own writes under its lease
    /// simply overwrite the record later). Read, change in Rust (records are postcard blobs),
    /// and write back only if the record is unchanged and still queued; else read again.
    async fn retry_pending_inner(&self, key: &str) -> Result<bool, StoreError> {
        let mut conn = self.durable.clone();
        for _ in 0..CAS_ATTEMPTS {
            let Some((partition, blob)) = self.raw_record(&mut conn, key).await? else {
                return Ok(false);
            };
            let mut record = decode(&blob)?;
            if !record.status.is_pending() {
                return Ok(false);
            }
            record.status = MutationStatus::Queued;
            record.next_attempt_at_ms = 0;
            let pk = self.keys.partition(&partition);
            let answer: i64 = RETRY_PENDING
                .key(pk.record(key))
                .key(pk.queue())
                .arg(key)
                .arg(record.seq)
                .arg(&blob)
                .arg(encode(&record)?)
                .invoke_async(&mut conn)
                .await?;
            match answer {
                1 => {
                    self.confirm_replicas(&mut conn).await?;
                    return Ok(true);
                }
                0 => return Ok(false),
                -1 => continue,
                other => return Err(unexpected("retry_pending", &Value::Int(other))),
            }
        }
        Err(kept_changing("retry_pending", key))
    }

    /// Operator's drop of a pending item or a dead letter (no lease, as for
    /// [`Self::retry_pending_inner`]). The replayer's later `update`/`finish` of a dropped item
    /// find it gone from the queue and change nothing.
    async fn drop_mutation_inner(&self, key: &str) -> Result<bool, StoreError> {
        let mut conn = self.durable.clone();
        for _ in 0..CAS_ATTEMPTS {
            let Some((partition, blob)) = self.raw_record(&mut conn, key).await? else {
                return Ok(false);
            };
            let mut record = decode(&blob)?;
            // Cheap pre-filter; the script decides by the queue and dead-letter lists (a
            // forwarded record may carry a dead-letter status without being on the list).
            if !record.status.is_pending() && !record.status.is_dead_letter() {
                return Ok(false);
            }
            let now = now_ms();
            record.mark_dropped(now);
            let pk = self.keys.partition(&partition);
            let answer: i64 = DROP
                .key(pk.record(key))
                .key(pk.queue())
                .key(pk.dead())
                .key(pk.done())
                .arg(key)
                .arg(record.seq)
                .arg(&blob)
                .arg(encode(&record)?)
                .arg(now)
                .invoke_async(&mut conn)
                .await?;
            match answer {
                1 => {
                    self.confirm_replicas(&mut conn).await?;
                    return Ok(true);
                }
                0 => return Ok(false),
                -1 => continue,
                other => return Err(unexpected("drop_mutation", &Value::Int(other))),
            }
        }
        Err(kept_changing("drop_mutation", key))
    }

    async fn purge_finished_inner(&self, before_ms: u64) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let registry = self.registry(&mut conn).await?;
        let mut purged = 0;
        for (partition, registered) in registry {
            let pk = self.keys.partition(&partition);
            loop {
                let keys: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                    .arg(pk.done())
                    .arg("-inf")
                    .arg(format!("({before_ms}"))
                    .arg("LIMIT")
                    .arg(0)
                    .arg(PURGE_BATCH)
                    .query_async(&mut conn)
                    .await?;
                if keys.is_empty() {
                    break;
                }
                // Index first: a record without index is invisible; an index without record is
                // harmless (module docs).
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.invoke_script(DELETE_IF.key(self.keys.index(key)).arg(&partition));
                }
                let _: Vec<Value> = match pipe.query_async(&mut conn).await {
                    Ok(v) => v,
                    Err(e) if e.kind() == ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                        DELETE_IF.load_async(&mut conn).await?;
                        pipe.query_async(&mut conn).await?
                    }
                    Err(e) => return Err(e.into()),
                };
                let mut purge = PURGE.key(pk.done());
                purge.arg(before_ms);
                for key in &keys {
                    purge.key(pk.record(key)).arg(key);
                }
                let n: u64 = purge.invoke_async(&mut conn).await?;
                purged += n;
                if keys.len() < PURGE_BATCH {
                    break;
                }
            }
            self.forget_if_idle(&mut conn, &partition, registered)
                .await?;
        }
        Ok(purged)
    }

    /// Drop an empty partition from the registry once it has been idle for [`PARTITION_IDLE`].
    async fn forget_if_idle(
        &self,
        conn: &mut ConnectionManager,
        partition: &str,
        registered: f64,
    ) -> Result<(), StoreError> {
        let idle_ms = PARTITION_IDLE.as_millis() as u64;
        // Cheap pre-filter on our clock; the script decides on Redis's.
        if registered > now_ms().saturating_sub(idle_ms) as f64 {
            return Ok(());
        }
        let pk = self.keys.partition(partition);
        let (q, dead, done): (u64, u64, u64) = redis::pipe()
            .cmd("ZCARD")
            .arg(pk.queue())
            .cmd("ZCARD")
            .arg(pk.dead())
            .cmd("ZCARD")
            .arg(pk.done())
            .query_async(conn)
            .await?;
        if q + dead + done > 0 {
            return Ok(());
        }
        let _: i64 = FORGET
            .key(self.keys.partitions())
            .arg(partition)
            .arg(registered)
            .arg(idle_ms)
            .invoke_async(conn)
            .await?;
        Ok(())
    }

    async fn cache_get_inner(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        let mut conn = self.conn.clone();
        let [blob, exp, lru, meta] = self.keys.cache();
        let found: Option<Vec<u8>> = CACHE_GET
            .key(blob)
            .key(exp)
            .key(lru)
            .key(meta)
            .arg(key)
            .invoke_async(&mut conn)
            .await?;
        Ok(found.map(Bytes::from))
    }

    async fn queue_stats_inner(&self) -> Result<QueueStats, StoreError> {
        let mut conn = self.conn.clone();
        let registry = self.registry(&mut conn).await?;
        let mut stats = QueueStats::default();
        if !registry.is_empty() {
            let mut pipe = redis::pipe();
            for (p, _) in &registry {
                let pk = self.keys.partition(p);
                pipe.cmd("ZCARD").arg(pk.queue());
                pipe.cmd("ZCARD").arg(pk.dead());
                pipe.cmd("ZRANGE").arg(pk.queue()).arg(0).arg(0);
            }
            let answers: Vec<Value> = pipe.query_async(&mut conn).await?;
            let mut heads = Vec::new();
            for ((p, _), chunk) in registry.iter().zip(answers.chunks(3)) {
                let [depth, dead, head] = chunk else {
                    return Err(unexpected("stats", &Value::Array(chunk.to_vec())));
                };
                stats.queue_depth += parse::<u64>(depth)?;
                stats.dead_letters += parse::<u64>(dead)?;
                if let Some(key) = parse::<Vec<String>>(head)?.into_iter().next() {
                    heads.push(self.keys.partition(p).record(&key));
                }
            }
            if !heads.is_empty() {
                let mut pipe = redis::pipe();
                for record_key in &heads {
                    pipe.cmd("GET").arg(record_key);
                }
                let blobs: Vec<Option<Vec<u8>>> = pipe.query_async(&mut conn).await?;
                for blob in blobs.into_iter().flatten() {
                    let at = decode(&blob)?.accepted_at_ms;
                    stats.oldest_pending_ms =
                        Some(stats.oldest_pending_ms.map_or(at, |o| o.min(at)));
                }
            }
        }
        Ok(stats)
    }

    async fn cache_stats_inner(&self) -> Result<CacheStats, StoreError> {
        let mut conn = self.conn.clone();
        let [blob, _, _, meta] = self.keys.cache();
        let (entries, bytes): (u64, Option<i64>) = redis::pipe()
            .cmd("HLEN")
            .arg(blob)
            .cmd("HGET")
            .arg(meta)
            .arg("bytes")
            .query_async(&mut conn)
            .await?;
        Ok(CacheStats {
            cache_entries: entries,
            cache_bytes: bytes.unwrap_or(0).max(0) as u64,
        })
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
        let mut conn = self.shared.conn.clone();
        let queue = self.shared.keys.partition(partition).queue();
        within("partition_has_pending", Duration::ZERO, async move {
            let n: u64 = redis::cmd("ZCARD")
                .arg(queue)
                .query_async(&mut conn)
                .await?;
            Ok(n > 0)
        })
        .await
    }

    async fn peek(&self, partition: &str, limit: usize) -> Result<Vec<MutationRecord>, StoreError> {
        within(
            "peek",
            Duration::ZERO,
            self.shared.peek_inner(partition, limit),
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
            self.shared.retry_dead_letter_inner(key),
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
            self.shared.drop_mutation_inner(key),
        )
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
        let Ok(permit) = self.shared.cache_puts.clone().try_acquire_owned() else {
            tracing::debug!("cache put dropped: too many in flight");
            return Ok(());
        };
        let mut conn = self.shared.conn.clone();
        let [blob, exp, lru, meta] = self.shared.keys.cache();
        let key = key.to_vec();
        // Past a century an entry is as good as eternal; keeps the Lua arithmetic exact.
        let ttl_ms = ttl.as_millis().min(100 * 365 * 24 * 3600 * 1000) as u64;
        let budget = self.shared.cache_budget;
        tokio::spawn(async move {
            let _permit = permit;
            let mut put = CACHE_PUT.prepare_invoke();
            put.key(blob)
                .key(exp)
                .key(lru)
                .key(meta)
                .arg(key)
                .arg(value.as_ref())
                .arg(ttl_ms)
                .arg(budget)
                .arg(CACHE_REAP);
            match tokio::time::timeout(CALL_DEADLINE, put.invoke_async::<i64>(&mut conn)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!("cache write failed: {e}"),
                Err(_) => tracing::warn!("cache write failed: no answer within {CALL_DEADLINE:?}"),
            }
        });
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
        let blob = postcard::to_stdvec(&(at_ms, credentials))?;
        let mut conn = self.shared.conn.clone();
        let mut pipe = redis::pipe();
        // Under the principal, and as the newest of anyone's for mutations of no principal.
        for name in [principal, "*"] {
            pipe.cmd("SET")
                .arg(self.shared.keys.credentials(name))
                .arg(blob.as_slice())
                .arg("PX")
                .arg(CREDENTIALS_TTL.as_millis() as u64)
                .ignore();
        }
        within("share_credentials", Duration::ZERO, async {
            pipe.query_async::<()>(&mut conn).await?;
            Ok(())
        })
        .await
    }

    async fn shared_credentials(
        &self,
        principal: &str,
        since_ms: u64,
    ) -> Result<Option<Vec<(String, Bytes)>>, StoreError> {
        let mut conn = self.shared.conn.clone();
        let key = self.shared.keys.credentials(principal);
        let blob: Option<Vec<u8>> = within("shared_credentials", Duration::ZERO, async {
            Ok(redis::cmd("GET").arg(key).query_async(&mut conn).await?)
        })
        .await?;
        let Some(blob) = blob else {
            return Ok(None);
        };
        let (at, credentials): (u64, Vec<(String, Bytes)>) = postcard::from_bytes(&blob)?;
        Ok((at > since_ms).then_some(credentials))
    }

    async fn announce_waiting(&self, ttl: Duration) -> Result<(), StoreError> {
        let mut conn = self.shared.conn.clone();
        let key = self.shared.keys.auth_waiting();
        within("announce_waiting", Duration::ZERO, async {
            redis::cmd("SET")
                .arg(key)
                .arg(1)
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .query_async::<()>(&mut conn)
                .await?;
            Ok(())
        })
        .await
    }

    async fn anyone_waiting(&self) -> Result<bool, StoreError> {
        let mut conn = self.shared.conn.clone();
        let key = self.shared.keys.auth_waiting();
        within("anyone_waiting", Duration::ZERO, async {
            Ok(redis::cmd("EXISTS").arg(key).query_async(&mut conn).await?)
        })
        .await
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

fn timed_out(what: &'static str, limit: Duration) -> StoreError {
    redis_error(
        ErrorKind::Io,
        "no answer in time",
        format!("{what} took longer than {limit:?}"),
    )
}

/// Log a warning when Redis would lose acknowledged mutations on a crash (best effort:
/// `CONFIG` may be disabled on managed Redis).
async fn warn_if_not_persistent(conn: &mut ConnectionManager, addr: &str) {
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

/// A store call with a lease of another partition is a caller bug; refuse it before writing.
fn check_lease_partition(lease: &Lease, record: &MutationRecord) -> Result<(), StoreError> {
    if lease.partition == record.partition {
        return Ok(());
    }
    Err(StoreError::LeaseLost {
        partition: record.partition.clone(),
    })
}

/// Map a lease-checked script's answer: -1 lease lost, 0 nothing to do, 1 written.
fn lease_answer(lease: &Lease, answer: i64) -> Result<(), StoreError> {
    match answer {
        -1 => Err(StoreError::LeaseLost {
            partition: lease.partition.clone(),
        }),
        0 | 1 => Ok(()),
        other => Err(unexpected("lease-checked write", &Value::Int(other))),
    }
}

/// The same error again, for every enqueue of a group that failed together.
fn copy_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Embedded(m) => StoreError::Embedded(m.clone()),
        StoreError::Redis(e) => StoreError::Redis(e.clone()),
        StoreError::Codec(e) => StoreError::Codec(e.clone()),
        StoreError::Closed => StoreError::Closed,
        StoreError::Task(m) => StoreError::Task(m.clone()),
        StoreError::Replicas { got, wanted } => StoreError::Replicas {
            got: *got,
            wanted: *wanted,
        },
        StoreError::LeaseLost { partition } => StoreError::LeaseLost {
            partition: partition.clone(),
        },
        StoreError::NotQueued { key } => StoreError::NotQueued { key: key.clone() },
        StoreError::NewerFormat {
            what,
            found,
            supported,
        } => StoreError::NewerFormat {
            what,
            found: *found,
            supported: *supported,
        },
    }
}

/// A compare-and-set write that lost [`CAS_ATTEMPTS`] times in a row.
fn kept_changing(what: &'static str, key: &str) -> StoreError {
    redis_error(
        ErrorKind::Client,
        "record kept changing",
        format!("{what} of {key:?} lost {CAS_ATTEMPTS} compare-and-set attempts"),
    )
}

fn redis_error(kind: ErrorKind, what: &'static str, detail: String) -> StoreError {
    StoreError::Redis(RedisError::from((kind, what, detail)))
}

fn unexpected(what: &'static str, value: &Value) -> StoreError {
    redis_error(
        ErrorKind::UnexpectedReturnType,
        "unexpected answer",
        format!("{what}: {value:?}"),
    )
}

fn parse<T: FromRedisValue>(value: &Value) -> Result<T, StoreError> {
    redis::from_redis_value_ref(value).map_err(|e| StoreError::Redis(e.into()))
}

/// Members and scores of `ZRANGE ... WITHSCORES` (a flat array in RESP2, pairs in RESP3).
fn scored(value: Value) -> Result<Vec<(String, f64)>, StoreError> {
    let Value::Array(items) = value else {
        return Err(unexpected("ZRANGE WITHSCORES", &value));
    };
    if items.iter().all(|i| matches!(i, Value::Array(_))) {
        return items
            .iter()
            .map(parse::<(String, f64)>)
            .collect::<Result<_, _>>();
    }
    items
        .chunks(2)
        .map(|pair| match pair {
            [member, score] => Ok((parse::<String>(member)?, parse::<f64>(score)?)),
            _ => Err(unexpected(
                "ZRANGE WITHSCORES",
                &Value::Array(pair.to_vec()),
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_cannot_break_out_of_their_hash_tag() {
        let keys = Keys {
            prefix: "outpost".into(),
        };
        assert_eq!(keys.partition("orders").queue(), "outpost:{p:orders}:q");
        assert_eq!(
            keys.partition("a}b{c%").record("k"),
            "outpost:{p:a%7Db%7Bc%25}:m:k"
        );
        // Distinct names stay distinct after escaping.
        assert_ne!(escape_tag("a%7D"), escape_tag("a}"));
    }

    #[test]
    fn zrange_withscores_parses_flat_and_paired_answers() {
        let flat = Value::Array(vec![
            Value::BulkString(b"a".to_vec()),
            Value::BulkString(b"1".to_vec()),
            Value::BulkString(b"b".to_vec()),
            Value::BulkString(b"2.5".to_vec()),
        ]);
        assert_eq!(
            scored(flat).expect("flat"),
            [("a".to_string(), 1.0), ("b".to_string(), 2.5)]
        );
        let paired = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"a".to_vec()),
            Value::Double(3.0),
        ])]);
        assert_eq!(scored(paired).expect("paired"), [("a".to_string(), 3.0)]);
    }
}
