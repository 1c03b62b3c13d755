//! The durable cache tier in Redis.
//!
//! **Cache.** The tier is split into *buckets*; an entry's bucket is a hash of its key. In a
//! bucket, blobs live in one hash with their expiry and recency in two zsets, all under the
//! bucket's tag `{c:<n>}` (one slot), so one script keeps the bucket's byte budget exact: a put
//! reaps a few expired entries, writes, then evicts the bucket's least recently used entries
//! until it is within `cache_budget / buckets` (the embedded store's policy, per bucket). The
//! number of buckets is chosen by the first instance from its budget (one per
//! [`BUCKET_BYTES`], at least 1, at most [`MAX_BUCKETS`]) and stored in `P:cache:buckets`, so
//! that every instance agrees; with several buckets a Redis Cluster spreads the tier over its
//! shards. `cache_entries`/`cache_bytes` are exact sums, including expired entries not yet
//! reaped. Puts are sent in the background (at most 256 at a time; more are dropped, which
//! costs a refetch). The tier is bounded by the budget, not by Redis's `maxmemory`. Redis must never evict outpost's keys
//! (records, leases): run it with `maxmemory-policy noeviction` and a `maxmemory` above the cache
//! budget plus the expected queue, so that a full Redis refuses writes (503) instead of dropping
//! data.

use std::time::Duration;

use bytes::Bytes;

use sha2::{Digest, Sha256};

use super::keys::Keys;
use super::primary::Conn;
use super::scripts::{CACHE_GET, CACHE_PUT};
use super::{CALL_DEADLINE, Shared};
use crate::store::{CacheStats, StoreError};

/// Cache puts sent in the background at once; more are dropped.
pub(super) const CACHE_PUTS_IN_FLIGHT: usize = 256;
/// Expired cache entries reaped per put.
const CACHE_REAP: usize = 32;
/// Budget per cache bucket when choosing their number.
const BUCKET_BYTES: u64 = 4 << 20;
/// The most cache buckets.
const MAX_BUCKETS: u64 = 32;

/// The number of cache buckets: the stored one, else one chosen from `budget` and stored
/// (`SET NX`, so that instances starting together agree).
pub(super) async fn buckets(conn: &mut Conn, keys: &Keys, budget: u64) -> Result<u32, StoreError> {
    let chosen = (budget / BUCKET_BYTES).clamp(1, MAX_BUCKETS);
    let key = keys.cache_buckets();
    let _: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg(chosen)
        .arg("NX")
        .query_async(conn)
        .await?;
    let stored: Option<u32> = redis::cmd("GET").arg(&key).query_async(conn).await?;
    Ok(stored.unwrap_or(1).clamp(1, MAX_BUCKETS as u32))
}

/// The bucket of cache key `key` among `buckets`.
fn bucket_of(key: &[u8], buckets: u32) -> u32 {
    let digest = Sha256::digest(key);
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % buckets.max(1)
}

impl Shared {
    pub(super) async fn cache_get_inner(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        let mut conn = self.conn.clone();
        let [blob, exp, lru, meta] = self.keys.cache(bucket_of(key, self.cache_buckets));
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

    /// Send a put in the background (module docs): dropped when too many are in flight, and
    /// logged, not returned, when it fails.
    pub(super) fn cache_put_in_background(&self, key: &[u8], value: Bytes, ttl: Duration) {
        let Ok(permit) = self.cache_puts.clone().try_acquire_owned() else {
            tracing::debug!("cache put dropped: too many in flight");
            return;
        };
        let mut conn = self.conn.clone();
        let [blob, exp, lru, meta] = self.keys.cache(bucket_of(key, self.cache_buckets));
        let key = key.to_vec();
        // Past a century an entry is as good as eternal; keeps the Lua arithmetic exact.
        let ttl_ms = ttl.as_millis().min(100 * 365 * 24 * 3600 * 1000) as u64;
        let budget = (self.cache_budget / u64::from(self.cache_buckets.max(1))).max(1);
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
    }

    pub(super) async fn cache_stats_inner(&self) -> Result<CacheStats, StoreError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for bucket in 0..self.cache_buckets {
            let [blob, _, _, meta] = self.keys.cache(bucket);
            pipe.cmd("HLEN")
                .arg(blob)
                .cmd("HGET")
                .arg(meta)
                .arg("bytes");
        }
        // Buckets are in different slots: on a cluster, one command at a time (`cluster.rs`).
        let answers: Vec<Option<i64>> = pipe.query_async(&mut conn).await?;
        let mut stats = CacheStats::default();
        for pair in answers.chunks(2) {
            stats.cache_entries += pair[0].unwrap_or(0).max(0) as u64;
            stats.cache_bytes += pair.get(1).copied().flatten().unwrap_or(0).max(0) as u64;
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_spread_over_the_buckets() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..200u32 {
            let b = bucket_of(&i.to_be_bytes(), 16);
            assert!(b < 16);
            seen.insert(b);
        }
        assert_eq!(seen.len(), 16, "200 keys reach every one of 16 buckets");
        assert_eq!(bucket_of(b"k", 1), 0);
        let keys = Keys {
            prefix: "outpost".into(),
        };
        assert_eq!(keys.cache(3)[0], "outpost:{c:3}:blob");
    }
}
