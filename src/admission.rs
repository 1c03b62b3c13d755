//! Admission to the queue: `queue.max_depth` and `queue.max_bytes`.
//!
//! A mutation that would be queued is first admitted here; beyond a limit it is refused with
//! `503 queue_full` (and `Retry-After`) before anything is stored, so the app never gets a
//! `202` for a write that is then dropped. Forwards while online never pass through here.
//!
//! What is counted: the store's own totals ([`Queue::queued_totals`]: every instance sharing
//! the store, so the Redis backend limits the shared queue), read at most every
//! [`REFRESH`] and again whenever a write would be refused; plus what this instance admitted
//! since that read: mutations being stored right now, and those stored since. The count errs
//! on the high side (an item stored while the totals are read may be counted twice, an item
//! replayed since is still counted) and only ever for at most [`REFRESH`]. Across instances of
//! one Redis, each instance sees the others' writes of the last [`REFRESH`] only on its next
//! read, so the shared queue can exceed a limit by what the other instances admit within that
//! window: a bound that is small next to any sensible limit.
//!
//! If the totals cannot be read (the store is failing), the last ones are used: the enqueue
//! that follows then fails on its own with `503 not_stored`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::QueueConfig;
use crate::error::ProxyError;
use crate::store::{QueueTotals, Store};

/// Longest time the store's totals are used before they are read again.
pub const REFRESH: Duration = Duration::from_millis(100);

/// The queue limits of one instance, and its count of what it admitted.
pub struct QueueLimits {
    store: Arc<dyn Store>,
    max_depth: u64,
    max_bytes: u64,
    /// The store's totals and when they were read (`None`: never).
    read: tokio::sync::Mutex<(QueueTotals, Option<Instant>)>,
    /// Admitted and being stored now.
    storing: Counter,
    /// Stored since the totals were last read.
    stored: Counter,
}

/// A depth and a byte count that admitted mutations add to and take from.
#[derive(Default)]
struct Counter {
    depth: AtomicU64,
    bytes: AtomicU64,
}

impl Counter {
    fn add(&self, bytes: u64) {
        self.depth.fetch_add(1, Ordering::AcqRel);
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    fn sub(&self, bytes: u64) {
        // Saturating: a reset between an add and its sub must not wrap around.
        let _ = self
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                Some(d.saturating_sub(1))
            });
        let _ = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some(b.saturating_sub(bytes))
            });
    }

    fn get(&self) -> QueueTotals {
        QueueTotals {
            depth: self.depth.load(Ordering::Acquire),
            bytes: self.bytes.load(Ordering::Acquire),
        }
    }

    fn reset(&self) {
        self.depth.store(0, Ordering::Release);
        self.bytes.store(0, Ordering::Release);
    }
}

/// A mutation admitted to the queue and being stored. Say [`Admitted::stored`] once the store
/// took it; dropped without that, it no longer counts.
pub struct Admitted {
    limits: Option<Arc<QueueLimits>>,
    bytes: u64,
}

impl Admitted {
    /// The store holds it now: it counts as stored until the totals are read again.
    pub fn stored(mut self) {
        if let Some(limits) = self.limits.take() {
            limits.storing.sub(self.bytes);
            limits.stored.add(self.bytes);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(limits) = self.limits.take() {
            limits.storing.sub(self.bytes);
        }
    }
}

impl QueueLimits {
    /// The limits of `config` over the totals of `store`.
    pub fn new(store: Arc<dyn Store>, config: &QueueConfig) -> Self {
        Self {
            store,
            max_depth: config.max_depth,
            max_bytes: config.max_bytes,
            read: tokio::sync::Mutex::new((QueueTotals::default(), None)),
            storing: Counter::default(),
            stored: Counter::default(),
        }
    }

    /// Admit a mutation with a body of `bytes` to the queue, or refuse it with
    /// [`ProxyError::QueueFull`].
    pub async fn admit(self: &Arc<Self>, bytes: u64) -> Result<Admitted, ProxyError> {
        if self.max_depth == 0 && self.max_bytes == 0 {
            return Ok(Admitted {
                limits: None,
                bytes,
            });
        }
        let mut read = self.read.lock().await;
        if read.1.is_none_or(|at| at.elapsed() >= REFRESH) {
            self.refresh(&mut read).await;
        }
        let mut usage = self.usage(&read.0);
        if self.over(&usage, bytes) {
            // The totals may be old: a refusal is only said on fresh ones.
            self.refresh(&mut read).await;
            usage = self.usage(&read.0);
            if self.over(&usage, bytes) {
                return Err(ProxyError::QueueFull {
                    depth: usage.depth,
                    bytes: usage.bytes,
                    max_depth: self.max_depth,
                    max_bytes: self.max_bytes,
                });
            }
        }
        self.storing.add(bytes);
        Ok(Admitted {
            limits: Some(self.clone()),
            bytes,
        })
    }

    /// Read the store's totals; what is stored from now on counts until the next read (an item
    /// stored while reading may count twice, never not at all).
    async fn refresh(&self, read: &mut (QueueTotals, Option<Instant>)) {
        self.stored.reset();
        match self.store.queued_totals().await {
            Ok(totals) => *read = (totals, Some(Instant::now())),
            Err(e) => {
                tracing::warn!("queue limits: could not read the queue's totals: {e}");
                read.1 = Some(Instant::now());
            }
        }
    }

    fn usage(&self, totals: &QueueTotals) -> QueueTotals {
        let storing = self.storing.get();
        let stored = self.stored.get();
        QueueTotals {
            depth: totals.depth + storing.depth + stored.depth,
            bytes: totals.bytes + storing.bytes + stored.bytes,
        }
    }

    /// Whether one more mutation of `bytes` would take `usage` over a limit.
    fn over(&self, usage: &QueueTotals, bytes: u64) -> bool {
        (self.max_depth != 0 && usage.depth + 1 > self.max_depth)
            || (self.max_bytes != 0 && usage.bytes + bytes > self.max_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn limits(max_depth: u64, max_bytes: u64) -> Arc<QueueLimits> {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(1 << 20, Duration::from_secs(10)));
        let config = QueueConfig {
            max_depth,
            max_bytes,
            ..QueueConfig::default()
        };
        Arc::new(QueueLimits::new(store, &config))
    }

    #[tokio::test]
    async fn admitted_mutations_count_until_the_store_holds_them() {
        let limits = limits(2, 0);
        let a = limits.admit(10).await.expect("first");
        let b = limits.admit(10).await.expect("second");
        assert!(matches!(
            limits.admit(10).await,
            Err(ProxyError::QueueFull { depth: 2, .. })
        ));
        // One was not stored after all: room for one more.
        drop(a);
        let c = limits.admit(10).await.expect("room again");
        b.stored();
        c.stored();
    }

    #[tokio::test]
    async fn bytes_limit_counts_bodies() {
        let limits = limits(0, 100);
        let _a = limits.admit(60).await.expect("60 of 100");
        assert!(matches!(
            limits.admit(41).await,
            Err(ProxyError::QueueFull { bytes: 60, .. })
        ));
        let _b = limits.admit(40).await.expect("exactly 100");
    }

    #[tokio::test]
    async fn zero_means_unlimited() {
        let limits = limits(0, 0);
        let all: Vec<_> = (0..1000).map(|_| limits.admit(u64::MAX / 2)).collect();
        for a in all {
            a.await.expect("unlimited");
        }
    }
}
