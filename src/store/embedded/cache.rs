//! The embedded cache tier: the [`ResponseStore`] role over the `cache` (key → expiry, recency
//! tick, blob) and `cache_lru` ((tick, key) → ()) tables. Puts and recency touches are *lazy*
//! writer ops (durable within a second, not answered); a put evicts least recently used entries
//! until the byte budget holds, in the same transaction.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redb::{ReadableDatabase, ReadableTable, WriteTransaction};

use super::writer::{Effect, Op};
use super::{CACHE, CACHE_LRU, EmbeddedStore, META};
use crate::store::{CacheStats, ResponseStore, StoreError, now_ms};

#[async_trait]
impl ResponseStore for EmbeddedStore {
    async fn cache_get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        let owned = key.to_vec();
        let found = self
            .read(move |db| {
                let read = db.begin_read()?;
                let table = read.open_table(CACHE)?;
                let Some(v) = table.get(owned.as_slice())? else {
                    return Ok(None);
                };
                let (expires, _, blob) = v.value();
                if expires < now_ms() {
                    return Ok(None);
                }
                Ok(Some(Bytes::copy_from_slice(blob)))
            })
            .await?;
        if found.is_some() {
            // Fire and forget: recency only steers eviction.
            let _ = self.send(Op::CacheTouch(key.to_vec()));
        }
        Ok(found)
    }

    async fn cache_put(&self, key: &[u8], value: Bytes, ttl: Duration) -> Result<(), StoreError> {
        let expires = now_ms().saturating_add(ttl.as_millis() as u64);
        self.send(Op::CachePut(key.to_vec(), value, expires))
    }

    async fn cache_stats(&self) -> Result<CacheStats, StoreError> {
        let c = self.counters.lock().map_err(|_| StoreError::Closed)?;
        Ok(CacheStats {
            cache_entries: c.cache_entries,
            cache_bytes: c.cache_bytes,
        })
    }
}

pub(super) fn cache_put(
    txn: &WriteTransaction,
    key: &[u8],
    value: &[u8],
    expires: u64,
    budget: u64,
) -> Result<Effect, StoreError> {
    let mut cache = txn.open_table(CACHE)?;
    let mut lru = txn.open_table(CACHE_LRU)?;
    let mut meta = txn.open_table(META)?;
    let tick = meta.get("cache_tick")?.map(|v| v.value()).unwrap_or(0) + 1;
    meta.insert("cache_tick", tick)?;
    let mut entries: i64 = 1;
    let mut bytes: i64 = value.len() as i64;
    if let Some(old) = cache.insert(key, (expires, tick, value))? {
        let (_, old_tick, old_blob) = old.value();
        entries -= 1;
        bytes -= old_blob.len() as i64;
        lru.remove((old_tick, key))?;
    }
    lru.insert((tick, key), ())?;
    let mut total = meta
        .get("cache_bytes")?
        .map(|v| v.value())
        .unwrap_or(0)
        .saturating_add_signed(bytes);
    // Evict least recently used entries until the budget holds.
    while total > budget {
        let Some((victim, _)) = lru.pop_first()? else {
            break;
        };
        let (_, victim_key) = victim.value();
        let victim_key = victim_key.to_vec();
        if let Some(old) = cache.remove(victim_key.as_slice())? {
            let len = old.value().2.len() as i64;
            total = total.saturating_sub(len as u64);
            entries -= 1;
            bytes -= len;
        }
    }
    meta.insert("cache_bytes", total)?;
    Ok(Effect::Cache { entries, bytes })
}

pub(super) fn cache_touch(txn: &WriteTransaction, key: &[u8]) -> Result<(), StoreError> {
    let mut cache = txn.open_table(CACHE)?;
    let mut lru = txn.open_table(CACHE_LRU)?;
    let mut meta = txn.open_table(META)?;
    let Some((expires, old_tick, blob)) = cache.get(key)?.map(|v| {
        let (e, t, b) = v.value();
        (e, t, b.to_vec())
    }) else {
        return Ok(());
    };
    let tick = meta.get("cache_tick")?.map(|v| v.value()).unwrap_or(0) + 1;
    meta.insert("cache_tick", tick)?;
    lru.remove((old_tick, key))?;
    lru.insert((tick, key), ())?;
    cache.insert(key, (expires, tick, blob.as_slice()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::record;
    use crate::store::{Queue, Store};

    #[tokio::test]
    async fn cache_is_bounded_by_evicting_least_recently_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path(), 3000).expect("open");
        let ttl = Duration::from_secs(60);
        for i in 0..3u8 {
            store
                .cache_put(&[i], Bytes::from(vec![i; 1000]), ttl)
                .await
                .expect("put");
        }
        // Writes are asynchronous: wait for the writer (a durable op) before reading.
        store.enqueue(record("sync-puts", "p")).await.expect("sync");
        // Touch 0 so that 1 is the least recently used.
        assert!(store.cache_get(&[0]).await.expect("get").is_some());
        store
            .cache_put(&[9], Bytes::from(vec![9; 1000]), ttl)
            .await
            .expect("put");
        // Writes are asynchronous: wait for the writer by a durable op.
        store.enqueue(record("sync", "p")).await.expect("sync");
        assert!(store.cache_get(&[0]).await.expect("get").is_some());
        assert!(store.cache_get(&[1]).await.expect("get").is_none());
        assert!(store.cache_get(&[9]).await.expect("get").is_some());
        let stats = store.stats().await.expect("stats");
        assert!(stats.cache_bytes <= 3000, "{stats:?}");
    }
}
