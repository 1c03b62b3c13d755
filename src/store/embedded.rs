//! The embedded store: one data directory holding one redb database (`outpost.redb`).
//!
//! **Durability.** All writes go through one writer thread (`embedded/writer.rs`) that commits
//! in *groups*: it takes every operation waiting in its channel (up to
//! `MAX_BATCH`), applies them in one write transaction and commits once.
//! Each op has a durability class:
//! - *now*: enqueues (coalescing ones included), answers of forwarded mutations (kept before
//!   the app hears them, so that its retry with the key finds them even after a crash) and
//!   operator actions (retry, edit, drop). A group holding one commits with
//!   `Durability::Immediate` (redb fsyncs before `commit` returns); only then are its callers
//!   answered, so a 202 is sent only after the commit that holds its mutation returned. Many
//!   concurrent writers share one fsync, which is what makes durable acknowledgement cheap.
//! - *progress*: replay progress (`update`, `finish`). With `replay.progress_sync = 0` (the
//!   default) these are *now* too: the replayer waits for the fsync before it sends the
//!   partition's next item, so after a crash at most the item in flight of each partition is
//!   sent again; concurrent partitions share fsyncs. With a window (`"10ms"`), replay progress
//!   waits in a write transaction the writer leaves open, and is committed durably, with
//!   whatever came meanwhile, one window after the first of it at the latest (sooner with an
//!   op of class *now*): one commit per window, not one per item. While such a transaction is
//!   open the writer takes its ops every 200 µs instead of being woken by each. Either way the
//!   callers are answered only once a durable commit covers them: a crash re-delivers at most
//!   one window's answers. Readers see replay progress up to one window late.
//! - *lazy*: cache blobs and LRU touches, not answered; made durable by the next durable commit
//!   or at the latest `LAZY_FLUSH` (1 s) after the first of them. Losing one
//!   costs a refetch.
//!
//! A caller is told "done" only once its op is durable (or, for lazy ops, never), and told the
//! error otherwise: a replayer whose answer could not be recorded keeps it and records it again
//! before sending anything else, instead of re-sending the item.
//!
//! **Coalescing.** [`Queue::enqueue_coalesced`](super::Queue::enqueue_coalesced) is one
//! transaction (check the folded record, its queue slot and the partition's tail; write both
//! records; the new key takes the folded one's `(partition, seq)` slot). That no replayer holds
//! the partition is checked against `drains`, the partitions acquired and not released: the
//! coalescing write holds it for reading until its commit is durable, `acquire` takes it for
//! writing, so a drain's first peek sees either the state before the fold or the fold done.
//!
//! **At rest.** The data directory is created 0700 and the database file 0600 (existing ones are
//! tightened, with a warning): queued mutations hold the app's bearer tokens. Finished items
//! keep neither body nor credentials, but redb is copy-on-write: their old pages stay in the
//! file's free space until reused, so the volume should be encrypted (see SECURITY.md).
//!
//! **Recovery.** redb is crash-safe (copy-on-write B-trees, checksummed commit slots): after
//! `kill -9` or power loss the database opens at the last durable commit. On open, the pending
//! counters are rebuilt from the `queue` table and the sequence counter from `meta`.
//!
//! After an I/O error (a full disk, say) redb refuses every later write transaction until the
//! database is closed and opened again, so the writer does that itself. The group whose begin or
//! commit failed is answered with the error (a 503, never a 202); then the writer takes the
//! shared handle away from readers and tries to reopen, 100 ms later, the wait doubling up to
//! 5 s while the database keeps failing (a successful commit resets it). An attempt closes the
//! old `Database` once no reader holds it (redb will not open one file twice in a process),
//! opens the file again at its last durable commit and rebuilds the counters, since the effects
//! of the failed commit and of non-durable ones before it may be gone. Meanwhile every write and
//! every database read fails at once with "reopening after an I/O error"; once space is freed,
//! the next attempt succeeds and writes are accepted again without a restart. An I/O error that
//! only poisons a transaction shows up at the next `begin_write` and is handled there.
//!
//! Tables: `mutations` (key → record), `queue` ((partition, seq) → key: pending items in
//! order), `dead` (seq → key), `finished` ((finished_at, key) → (): retention sweep), `meta`
//! (name → u64), `cache` (key → (expires, tick, blob)) and `cache_lru` ((tick, key) → ()).
//!
//! **Code.** This file: the tables, [`EmbeddedStore`] and its (trivial) coordination;
//! `embedded/writer.rs`: the writer thread (group commit, durability classes, reopening);
//! `embedded/queue.rs`: the queue's transactions and reads; `embedded/cache.rs`: the cache
//! tier and its LRU eviction; `embedded/files.rs`: owner-only directory and file.

mod cache;
mod files;
mod queue;
mod tables;
mod writer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redb::{Database, TableDefinition};

use crate::handoff;

use self::files::{private_dir, private_file};
use self::writer::{Counters, DbHandle, Op, Reply, SharedDb, Writer, current, open_database};
use super::{Coordination, Lease, StoreError};

const MUTATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("mutations");
const QUEUE: TableDefinition<(&str, u64), &str> = TableDefinition::new("queue");
const DEAD: TableDefinition<u64, &str> = TableDefinition::new("dead");
const FINISHED: TableDefinition<(u64, &str), ()> = TableDefinition::new("finished");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const CACHE: TableDefinition<&[u8], (u64, u64, &[u8])> = TableDefinition::new("cache");
const CACHE_LRU: TableDefinition<(u64, &[u8]), ()> = TableDefinition::new("cache_lru");

/// redb page cache when not configured (`store.page_cache_bytes`). Small on purpose: redb
/// reads the file with `pread`, so a page it does not hold comes from the kernel's page cache
/// (shared, and not counted in the process's RSS), and an enqueue or a replay touches only the
/// tails and heads of its tables. A larger cache fills slowly as the queue deepens (with 32 MiB,
/// RSS rose from 89 to 98 MB between 100 k and 1 M queued items; with 8 MiB it stays near
/// 65 MB), and durable write throughput measured the same with either.
pub const DEFAULT_PAGE_CACHE: usize = 8 * 1024 * 1024;

/// The embedded backend (see the module docs for its guarantees).
pub struct EmbeddedStore {
    db: SharedDb,
    tx: Mutex<Option<mpsc::Sender<Op>>>,
    counters: Arc<Mutex<Counters>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Partitions a replayer holds (acquired, not yet released), with how many times. Taken
    /// for reading by [`Queue::enqueue_coalesced`](super::Queue::enqueue_coalesced) until its
    /// write is durable, and for writing by `acquire` and `release`: a coalescing write and
    /// the start of a drain never interleave.
    drains: tokio::sync::RwLock<HashMap<String, usize>>,
}

impl EmbeddedStore {
    /// Open (or create) the store in `dir`, with `cache_budget` bytes for cache blobs on disk.
    pub fn open(dir: &Path, cache_budget: u64) -> Result<Self, StoreError> {
        Self::open_with_page_cache(dir, cache_budget, DEFAULT_PAGE_CACHE, Duration::ZERO)
    }

    /// Open with `page_cache` bytes of redb page cache (the cache is what the process's memory
    /// grows with as the database grows, so it is bounded here, not left at redb's 1 GiB), and
    /// replay progress made durable per `progress_sync` (`replay.progress_sync`; zero: before
    /// each `update`/`finish` returns).
    pub fn open_with_page_cache(
        dir: &Path,
        cache_budget: u64,
        page_cache: usize,
        progress_sync: Duration,
    ) -> Result<Self, StoreError> {
        private_dir(dir)?;
        let path = dir.join("outpost.redb");
        private_file(&path)?;
        let (db, counters) = open_database(&path, page_cache)?;
        let db = Arc::new(RwLock::new(DbHandle::Open(Arc::new(db))));
        let counters = Arc::new(Mutex::new(counters));
        let (tx, rx) = mpsc::channel();
        let writer = Writer::new(
            db.clone(),
            path,
            page_cache,
            counters.clone(),
            cache_budget,
            progress_sync,
        );
        let handle = std::thread::Builder::new()
            .name("outpost-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Embedded(format!("spawn writer: {e}")))?;
        Ok(Self {
            db,
            tx: Mutex::new(Some(tx)),
            counters,
            writer: Mutex::new(Some(handle)),
            drains: tokio::sync::RwLock::default(),
        })
    }

    /// Flush pending non-durable work and stop the writer thread.
    pub fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(handle) = self.writer.lock().ok().and_then(|mut h| h.take()) {
            let _ = handle.join();
        }
    }

    fn send(&self, op: Op) -> Result<(), StoreError> {
        let guard = self.tx.lock().map_err(|_| StoreError::Closed)?;
        let tx = guard.as_ref().ok_or(StoreError::Closed)?;
        tx.send(op).map_err(|_| StoreError::Closed)
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (reply, rx) = handoff::channel();
        self.send(make(reply))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = current(&self.db).map_err(StoreError::Embedded)?;
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Embedded(format!("reader task: {e}")))?
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// One process owns the data directory (redb locks the file), so there is nobody to
/// coordinate with: every lease is granted (the replayer itself runs one drain per partition),
/// and credentials offered to this process are already in its own memory, where replay looks
/// first.
#[async_trait]
impl Coordination for EmbeddedStore {
    async fn acquire(&self, partition: &str) -> Result<Option<Lease>, StoreError> {
        // One process owns the data directory, and the replayer runs one worker per partition.
        // Noted (after any coalescing write in progress is durable), so that nothing is folded
        // into an item this drain may send.
        *self
            .drains
            .write()
            .await
            .entry(partition.to_string())
            .or_default() += 1;
        Ok(Some(Lease {
            partition: partition.to_string(),
            token: 0,
        }))
    }

    /// Always true: no other instance can take a partition over.
    async fn renew(&self, _lease: &Lease) -> Result<bool, StoreError> {
        Ok(true)
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut drains = self.drains.write().await;
        if let Some(n) = drains.get_mut(&lease.partition) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                drains.remove(&lease.partition);
            }
        }
        Ok(())
    }

    /// Keeps nothing: no other instance replays this store's mutations, and the offering
    /// process's credentials vault already holds what the app offered.
    async fn share_credentials(
        &self,
        _principal: &str,
        _credentials: &[(String, Bytes)],
        _at_ms: u64,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    /// Always none: nobody else shares any (see [`Self::share_credentials`]).
    async fn shared_credentials(
        &self,
        _principal: &str,
        _since_ms: u64,
    ) -> Result<Option<Vec<(String, Bytes)>>, StoreError> {
        Ok(None)
    }

    /// Nobody to tell: the waiting mutation is replayed by this process, which sees the app's
    /// fresh credentials itself.
    async fn announce_waiting(&self, _ttl: Duration) -> Result<(), StoreError> {
        Ok(())
    }

    /// Always false: there is no other instance.
    async fn anyone_waiting(&self) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// True: redb locks the file, so this process is the only one using it.
    fn exclusive(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Queue;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(EmbeddedStore::open(dir.path(), 1 << 20).expect("open"));
        super::super::conformance::run_all(store).await;
    }

    #[tokio::test]
    async fn coordination_is_local_every_lease_is_granted_and_nothing_is_shared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path(), 1 << 20).expect("open");
        let first = store.acquire("p").await.expect("acquire").expect("granted");
        let second = store
            .acquire("p")
            .await
            .expect("acquire")
            .expect("granted again");
        assert!(store.renew(&first).await.expect("renew"));
        assert!(store.renew(&second).await.expect("renew"));
        let creds = [("authorization".to_string(), Bytes::from_static(b"Bearer t"))];
        store
            .share_credentials("alice", &creds, 5)
            .await
            .expect("share");
        let shared = store.shared_credentials("alice", 0).await.expect("read");
        assert!(
            shared.is_none(),
            "kept in the process's own vault, not here"
        );
        store
            .announce_waiting(Duration::from_secs(5))
            .await
            .expect("announce");
        assert!(
            !store.anyone_waiting().await.expect("waiting"),
            "no one else"
        );
    }

    #[tokio::test]
    async fn progress_under_a_window_is_committed_with_the_next_enqueue_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let window = Duration::from_millis(10);
        let keys = ["w1", "w2", "w3"];
        {
            let store = Arc::new(
                EmbeddedStore::open_with_page_cache(dir.path(), 1 << 20, 1 << 20, window)
                    .expect("open"),
            );
            for key in keys {
                let r = super::super::conformance::record(key, "p");
                store.enqueue(r).await.expect("enqueue");
            }
            let lease = store.acquire("p").await.expect("acquire").expect("lease");
            let items = store.peek("p", 10).await.expect("peek");
            // Two finishes wait in the open transaction together; an enqueue meanwhile commits
            // them with it.
            let mut finishes = tokio::task::JoinSet::new();
            for mut item in items.into_iter().take(2) {
                item.status = crate::store::MutationStatus::Succeeded;
                let (store, lease) = (store.clone(), lease.clone());
                finishes.spawn(async move { store.finish(&lease, &item).await });
            }
            let r = super::super::conformance::record("w4", "p");
            store.enqueue(r).await.expect("enqueue");
            while let Some(done) = finishes.join_next().await {
                done.expect("task").expect("finish");
            }
            let left = store.peek("p", 10).await.expect("peek");
            let left: Vec<&str> = left.iter().map(|r| r.key.as_str()).collect();
            assert_eq!(left, ["w3", "w4"], "answered finishes are visible");
            store.close();
        }
        let store = EmbeddedStore::open(dir.path(), 1 << 20).expect("reopen");
        let left = store.peek("p", 10).await.expect("peek");
        let left: Vec<&str> = left.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(left, ["w3", "w4"], "kept across a reopen");
        let done = store.mutation("w1").await.expect("read").expect("kept");
        assert_eq!(done.status, crate::store::MutationStatus::Succeeded);
        assert!(
            store
                .peek_after("p", u64::MAX, 1)
                .await
                .expect("peek")
                .is_empty()
        );
    }

    /// Queue ops share the batch's open tables (`tables.rs`), and the ops that open tables on
    /// the raw transaction (cache, purge) close them first: every kind, mixed in one batch,
    /// applies without redb refusing a table opened twice.
    #[tokio::test]
    async fn queue_cache_and_purge_ops_mixed_in_one_batch_all_apply() {
        use crate::store::{Enqueued, MutationStatus, ResponseStore};
        let dir = tempfile::tempdir().expect("tempdir");
        let first = {
            let store = EmbeddedStore::open(dir.path(), 1 << 20).expect("open");
            for key in ["k1", "k2"] {
                let r = super::super::conformance::record(key, "p");
                store.enqueue(r).await.expect("enqueue");
            }
            let first = store.peek("p", 1).await.expect("peek").remove(0);
            store.close();
            first
        };
        // A writer fed the whole batch before it starts: its first receive takes all of it.
        let path = dir.path().join("outpost.redb");
        let (db, counters) = open_database(&path, 1 << 20).expect("open database");
        let writer = Writer::new(
            Arc::new(RwLock::new(DbHandle::Open(Arc::new(db)))),
            path,
            1 << 20,
            Arc::new(Mutex::new(counters)),
            1 << 20,
            Duration::ZERO,
        );
        let (tx, rx) = mpsc::channel();
        let (enq3, enq3_rx) = handoff::channel();
        let (fin, fin_rx) = handoff::channel();
        let (purge, purge_rx) = handoff::channel();
        let (enq4, enq4_rx) = handoff::channel();
        let (retry, retry_rx) = handoff::channel();
        let mut finished = first;
        finished.status = MutationStatus::Succeeded;
        finished.finished_at_ms = Some(crate::store::now_ms());
        let ops = vec![
            Op::Enqueue(Box::new(super::super::conformance::record("k3", "p")), enq3),
            Op::CachePut(b"c1".to_vec(), Bytes::from_static(b"blob"), u64::MAX),
            Op::Finish(Box::new(finished), fin),
            Op::CacheTouch(b"c1".to_vec()),
            Op::Purge(0, purge),
            Op::Enqueue(Box::new(super::super::conformance::record("k4", "q")), enq4),
            Op::RetryPending("k2".into(), retry),
        ];
        for op in ops {
            tx.send(op).expect("send");
        }
        drop(tx);
        tokio::task::spawn_blocking(move || writer.run(rx))
            .await
            .expect("writer ran");
        for (what, rx) in [("k3", enq3_rx), ("k4", enq4_rx)] {
            let done = rx.await.expect("answered").expect("enqueued");
            assert!(
                matches!(done, Enqueued::Accepted { .. }),
                "{what}: {done:?}"
            );
        }
        fin_rx.await.expect("answered").expect("finished");
        assert_eq!(purge_rx.await.expect("answered").expect("purged"), 0);
        assert!(retry_rx.await.expect("answered").expect("retried"));

        let store = EmbeddedStore::open(dir.path(), 1 << 20).expect("reopen");
        let pending: Vec<String> = store
            .peek("p", 10)
            .await
            .expect("peek")
            .into_iter()
            .map(|r| r.key)
            .collect();
        assert_eq!(pending, ["k2", "k3"], "k1 finished, k3 queued behind k2");
        assert_eq!(store.peek("q", 10).await.expect("peek").len(), 1, "k4");
        let k1 = store.mutation("k1").await.expect("read").expect("k1 kept");
        assert_eq!(k1.status, MutationStatus::Succeeded);
        assert_eq!(
            store.cache_get(b"c1").await.expect("cache read").as_deref(),
            Some(&b"blob"[..])
        );
    }

    #[tokio::test]
    async fn pending_items_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = EmbeddedStore::open(dir.path(), 1 << 20).expect("open");
            let r = super::super::conformance::record("k1", "p");
            store.enqueue(r).await.expect("enqueue");
            store.close();
        }
        let store = EmbeddedStore::open(dir.path(), 1 << 20).expect("reopen");
        assert!(store.partition_has_pending("p").await.expect("pending"));
        let items = store.peek("p", 10).await.expect("peek");
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].key, "k1");
    }
}
