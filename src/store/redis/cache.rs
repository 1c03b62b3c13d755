//! The durable cache tier in Redis.
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

use std::time::Duration;

use bytes::Bytes;

use super::scripts::{CACHE_GET, CACHE_PUT};
use super::{CALL_DEADLINE, Shared};
use crate::store::{CacheStats, StoreError};

/// Cache puts sent in the background at once; more are dropped.
pub(super) const CACHE_PUTS_IN_FLIGHT: usize = 256;
/// Expired cache entries reaped per put.
const CACHE_REAP: usize = 32;

impl Shared {
    pub(super) async fn cache_get_inner(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
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

    /// Send a put in the background (module docs): dropped when too many are in flight, and
    /// logged, not returned, when it fails.
    pub(super) fn cache_put_in_background(&self, key: &[u8], value: Bytes, ttl: Duration) {
        let Ok(permit) = self.cache_puts.clone().try_acquire_owned() else {
            tracing::debug!("cache put dropped: too many in flight");
            return;
        };
        let mut conn = self.conn.clone();
        let [blob, exp, lru, meta] = self.keys.cache();
        let key = key.to_vec();
        // Past a century an entry is as good as eternal; keeps the Lua arithmetic exact.
        let ttl_ms = ttl.as_millis().min(100 * 365 * 24 * 3600 * 1000) as u64;
        let budget = self.cache_budget;
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
