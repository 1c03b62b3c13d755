//! The in-memory store: every role of [`super::Store`] in process memory, behind one mutex.
//!
//! **What it is for.** Tests of the code above the store (outbox, replay, cache, admin) that
//! need a real store without a data directory or a Redis server: it passes the same conformance
//! suite as the embedded and Redis backends, answers at once, and never fails on its own.
//! Nothing is durable: dropping the last handle forgets everything, so it is never a backend
//! for a running outpost.
//!
//! **What is stored**, as in the other backends: mutation records by key; per partition, the
//! pending keys by sequence number (the FIFO); the dead-letter list by sequence number; finished
//! keys by finishing time (the retention sweep); cache blobs with expiry and recency, evicted
//! least recently used first past the byte budget. Records are kept as values, not encoded.
//!
//! **Invariants.** Every call takes the one lock, applies the whole operation and releases it,
//! so each operation is atomic and sequence numbers increase in acceptance order. Queue
//! operations follow the embedded store exactly (a dropped item's late `update` is refused with
//! [`StoreError::NotQueued`], its late `finish` changes nothing), apart from the lease check
//! below.
//!
//! **Coordination** follows the Redis backend, so that tests can play several instances:
//! [`MemoryStore::another_instance`] is a second handle on the same state with an identity of
//! its own. A partition's lease belongs to one instance at a time, carries a fencing token that
//! grows with every acquisition, and expires after the lease length unless renewed; `update`
//! and `finish` with a lease that is not the partition's current one fail with
//! [`StoreError::LeaseLost`]. Shared credentials are kept for an hour under the principal and
//! under `*` (anyone's newest); a waiting announcement lasts its `ttl`. Expiry uses tokio's
//! clock, so a test under `tokio::time::pause()` moves it by advancing time.
//!
//! **Code.** This file: [`MemoryStore`] and its three roles; `memory/state.rs`: the data and
//! the queue and cache operations on it.

mod state;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use self::state::{Cache, Held, SharedCredentials, State};
use super::{
    CacheStats, Coalesced, Coordination, DeadLetterEdit, Enqueued, Lease, MutationRecord, Queue,
    QueueStats, QueueTotals, ResponseStore, StoreError, now_ms,
};

/// How long shared credentials are kept (they are tokens: as long as the Redis backend does).
const CREDENTIALS_TTL: Duration = Duration::from_secs(3600);

/// The in-memory backend (see the module docs): one handle per simulated instance.
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    /// This handle's identity in leases.
    instance: u64,
    /// How long a lease lasts unless renewed.
    lease: Duration,
    /// How long each cache read takes (a slow network store, for tests of ordering).
    cache_read_delay: Duration,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("instance", &self.instance)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store with `cache_budget` bytes for cache blobs, whose leases last `lease`
    /// unless renewed (the replayer renews every third of `store.redis_lease`: pass that).
    pub fn new(cache_budget: u64, lease: Duration) -> Self {
        let state = State {
            instances: 1,
            cache: Cache {
                budget: cache_budget,
                ..Cache::default()
            },
            ..State::default()
        };
        Self {
            state: Arc::new(Mutex::new(state)),
            instance: 1,
            lease,
            cache_read_delay: Duration::ZERO,
        }
    }

    /// The same store, whose cache reads each take `delay` first (as over a slow network).
    pub fn with_cache_read_delay(mut self, delay: Duration) -> Self {
        self.cache_read_delay = delay;
        self
    }

    /// Another instance on the same state, as a second outpost sharing one Redis: it sees the
    /// same queue and cache, but holds leases of its own.
    pub fn another_instance(&self) -> Result<Self, StoreError> {
        let mut state = self.lock()?;
        state.instances += 1;
        Ok(Self {
            state: self.state.clone(),
            instance: state.instances,
            lease: self.lease,
            cache_read_delay: self.cache_read_delay,
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.state
            .lock()
            .map_err(|_| StoreError::Task("the memory store's lock was poisoned by a panic".into()))
    }

    /// Refuse a write under a lease that is not `partition`'s current one (or of another
    /// partition), as the Redis backend's scripts do.
    fn check_lease(
        &self,
        state: &State,
        lease: &Lease,
        record: &MutationRecord,
    ) -> Result<(), StoreError> {
        if lease.partition != record.partition {
            return Err(StoreError::LeaseLost {
                partition: record.partition.clone(),
            });
        }
        if state.holds(&lease.partition, self.instance, lease.token) {
            return Ok(());
        }
        Err(StoreError::LeaseLost {
            partition: lease.partition.clone(),
        })
    }
}

#[async_trait]
impl Queue for MemoryStore {
    async fn enqueue(&self, record: MutationRecord) -> Result<Enqueued, StoreError> {
        Ok(self.lock()?.enqueue(record))
    }

    async fn enqueue_coalesced(
        &self,
        record: MutationRecord,
        folded: &MutationRecord,
        tail_seq: u64,
    ) -> Result<Coalesced, StoreError> {
        Ok(self.lock()?.enqueue_coalesced(record, folded, tail_seq))
    }

    async fn peek_tail(
        &self,
        partition: &str,
        limit: usize,
    ) -> Result<Vec<MutationRecord>, StoreError> {
        Ok(self.lock()?.peek_tail(partition, limit))
    }

    async fn record_forwarded(&self, record: MutationRecord) -> Result<(), StoreError> {
        self.lock()?.record_forwarded(record);
        Ok(())
    }

    async fn mutation(&self, key: &str) -> Result<Option<MutationRecord>, StoreError> {
        Ok(self.lock()?.records.get(key).cloned())
    }

    async fn pending_partitions(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.lock()?.queues.keys().cloned().collect())
    }

    async fn partition_has_pending(&self, partition: &str) -> Result<bool, StoreError> {
        Ok(self.lock()?.queues.contains_key(partition))
    }

    async fn peek(&self, partition: &str, limit: usize) -> Result<Vec<MutationRecord>, StoreError> {
        Ok(self.lock()?.peek(partition, limit))
    }

    async fn peek_after(
        &self,
        partition: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<MutationRecord>, StoreError> {
        Ok(self.lock()?.peek_after(partition, after, limit))
    }

    /// Always true: memory takes every write.
    fn writable(&self) -> bool {
        true
    }

    async fn update(&self, lease: &Lease, record: &MutationRecord) -> Result<(), StoreError> {
        let mut state = self.lock()?;
        self.check_lease(&state, lease, record)?;
        if !state.is_queued(record) {
            return Err(StoreError::NotQueued {
                key: record.key.clone(),
            });
        }
        state.records.insert(record.key.clone(), record.clone());
        Ok(())
    }

    async fn finish(&self, lease: &Lease, record: &MutationRecord) -> Result<(), StoreError> {
        let mut state = self.lock()?;
        self.check_lease(&state, lease, record)?;
        state.finish(record);
        Ok(())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<MutationRecord>, StoreError> {
        let state = self.lock()?;
        Ok(state
            .dead
            .values()
            .filter_map(|key| state.records.get(key).cloned())
            .take(limit)
            .collect())
    }

    async fn retry_dead_letter(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.lock()?.retry_dead_letter(key, None))
    }

    async fn retry_pending(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.lock()?.retry_pending(key))
    }

    async fn drop_mutation(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.lock()?.drop_mutation(key, None))
    }

    async fn edit_dead_letter(&self, key: &str, edit: DeadLetterEdit) -> Result<bool, StoreError> {
        let mut state = self.lock()?;
        Ok(match edit {
            DeadLetterEdit::Headers(headers) => state.retry_dead_letter(key, Some(headers)),
            DeadLetterEdit::Superseded(new_key) => state.drop_mutation(key, Some(&new_key)),
        })
    }

    async fn purge_finished(&self, before_ms: u64) -> Result<u64, StoreError> {
        Ok(self.lock()?.purge_finished(before_ms))
    }

    async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        Ok(self.lock()?.queue_stats())
    }

    async fn partition_depths(&self) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self.lock()?.partition_depths())
    }

    async fn queued_totals(&self) -> Result<QueueTotals, StoreError> {
        Ok(self.lock()?.queued_totals())
    }
}

#[async_trait]
impl ResponseStore for MemoryStore {
    async fn cache_get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        if !self.cache_read_delay.is_zero() {
            tokio::time::sleep(self.cache_read_delay).await;
        }
        Ok(self.lock()?.cache.get(key))
    }

    async fn cache_put(&self, key: &[u8], value: Bytes, ttl: Duration) -> Result<(), StoreError> {
        let expires_ms = now_ms().saturating_add(super::millis(ttl));
        self.lock()?.cache.put(key, value, expires_ms);
        Ok(())
    }

    async fn cache_stats(&self) -> Result<CacheStats, StoreError> {
        let state = self.lock()?;
        Ok(CacheStats {
            cache_entries: state.cache.entries.len() as u64,
            cache_bytes: state.cache.bytes,
        })
    }
}

#[async_trait]
impl Coordination for MemoryStore {
    async fn acquire(&self, partition: &str) -> Result<Option<Lease>, StoreError> {
        let mut state = self.lock()?;
        state.fence += 1;
        let token = state.fence;
        let now = Instant::now();
        if let Some(held) = state.leases.get(partition)
            && held.instance != self.instance
            && held.until > now
        {
            return Ok(None);
        }
        let held = Held {
            instance: self.instance,
            token,
            until: now + self.lease,
        };
        state.leases.insert(partition.to_string(), held);
        Ok(Some(Lease {
            partition: partition.to_string(),
            token,
        }))
    }

    async fn renew(&self, lease: &Lease) -> Result<bool, StoreError> {
        let mut state = self.lock()?;
        if !state.holds(&lease.partition, self.instance, lease.token) {
            return Ok(false);
        }
        if let Some(held) = state.leases.get_mut(&lease.partition) {
            held.until = Instant::now() + self.lease;
        }
        Ok(true)
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut state = self.lock()?;
        let ours = state
            .leases
            .get(&lease.partition)
            .is_some_and(|held| held.instance == self.instance && held.token == lease.token);
        if ours {
            state.leases.remove(&lease.partition);
        }
        Ok(())
    }

    async fn share_credentials(
        &self,
        principal: &str,
        credentials: &[(String, Bytes)],
        at_ms: u64,
    ) -> Result<(), StoreError> {
        let mut state = self.lock()?;
        let until = Instant::now() + CREDENTIALS_TTL;
        // Under the principal, and as the newest of anyone's for mutations of no principal.
        for name in [principal, "*"] {
            let shared = SharedCredentials {
                at_ms,
                credentials: credentials.to_vec(),
                until,
            };
            state.credentials.insert(name.to_string(), shared);
        }
        Ok(())
    }

    async fn shared_credentials(
        &self,
        principal: &str,
        since_ms: u64,
    ) -> Result<Option<Vec<(String, Bytes)>>, StoreError> {
        let state = self.lock()?;
        Ok(state
            .credentials
            .get(principal)
            .filter(|shared| shared.until > Instant::now() && shared.at_ms > since_ms)
            .map(|shared| shared.credentials.clone()))
    }

    async fn announce_waiting(&self, ttl: Duration) -> Result<(), StoreError> {
        self.lock()?.waiting_until = Some(Instant::now() + ttl);
        Ok(())
    }

    async fn anyone_waiting(&self) -> Result<bool, StoreError> {
        let state = self.lock()?;
        Ok(state
            .waiting_until
            .is_some_and(|until| until > Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    fn store() -> MemoryStore {
        MemoryStore::new(1 << 20, Duration::from_secs(10))
    }

    #[tokio::test]
    async fn conformance() {
        conformance::run_all(Arc::new(store())).await;
    }

    #[tokio::test]
    async fn instances_share_the_queue_and_coordinate_like_redis_instances() {
        let a = store();
        let b = a.another_instance().expect("second instance");
        conformance::coordination::shared_between(&a, &b).await;
    }

    #[tokio::test]
    async fn a_lease_not_renewed_expires_and_another_instance_takes_over() {
        let a = MemoryStore::new(1 << 20, Duration::from_millis(20));
        let b = a.another_instance().expect("second instance");
        a.enqueue(conformance::record("e1", "p"))
            .await
            .expect("enqueue");
        let stale = a.acquire("p").await.expect("acquire").expect("a holds it");
        assert!(b.acquire("p").await.expect("acquire").is_none());
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(!a.renew(&stale).await.expect("renew"), "expired");
        let lease = b
            .acquire("p")
            .await
            .expect("acquire")
            .expect("b takes over");
        let item = b.peek("p", 1).await.expect("peek").remove(0);
        assert!(matches!(
            a.update(&stale, &item).await,
            Err(StoreError::LeaseLost { .. })
        ));
        b.update(&lease, &item).await.expect("the holder updates");
    }

    #[tokio::test]
    async fn cache_is_bounded_by_evicting_least_recently_used() {
        let store = MemoryStore::new(3000, Duration::from_secs(10));
        let ttl = Duration::from_secs(60);
        for i in 0..3u8 {
            store
                .cache_put(&[i], Bytes::from(vec![i; 1000]), ttl)
                .await
                .expect("put");
        }
        // Touch 0 so that 1 is the least recently used.
        assert!(store.cache_get(&[0]).await.expect("get").is_some());
        store
            .cache_put(&[9], Bytes::from(vec![9; 1000]), ttl)
            .await
            .expect("put");
        assert!(store.cache_get(&[0]).await.expect("get").is_some());
        assert!(store.cache_get(&[1]).await.expect("get").is_none());
        assert!(store.cache_get(&[9]).await.expect("get").is_some());
        let stats = store.cache_stats().await.expect("stats");
        assert_eq!((stats.cache_entries, stats.cache_bytes), (3, 3000));
    }
}
