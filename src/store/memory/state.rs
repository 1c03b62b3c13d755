//! What an in-memory store holds, and the queue and cache operations on it (each applied whole
//! under the store's one lock: see [`super`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use tokio::time::Instant;

use crate::store::{
    Coalesced, Enqueued, MutationRecord, MutationStatus, QueueStats, QueueTotals, now_ms,
};

/// Everything one store holds (shared by its instances).
#[derive(Default)]
pub(super) struct State {
    pub(super) records: HashMap<String, MutationRecord>,
    /// Partition → sequence number → key: the pending items in order.
    pub(super) queues: BTreeMap<String, BTreeMap<u64, String>>,
    /// Sequence number → key.
    pub(super) dead: BTreeMap<u64, String>,
    /// (finished at, key): the retention sweep's order.
    pub(super) finished: BTreeSet<(u64, String)>,
    /// The last sequence number given out.
    pub(super) seq: u64,
    /// The last fencing token given out.
    pub(super) fence: u64,
    /// Instances created so far (their ids are 1..=instances).
    pub(super) instances: u64,
    pub(super) leases: HashMap<String, Held>,
    /// Principal (or `*`) → the newest credentials shared for it.
    pub(super) credentials: HashMap<String, SharedCredentials>,
    /// Until when some instance announced a mutation waiting for credentials.
    pub(super) waiting_until: Option<Instant>,
    pub(super) cache: Cache,
}

/// A partition's current lease.
pub(super) struct Held {
    pub(super) instance: u64,
    pub(super) token: u64,
    pub(super) until: Instant,
}

pub(super) struct SharedCredentials {
    pub(super) at_ms: u64,
    pub(super) credentials: Vec<(String, Bytes)>,
    pub(super) until: Instant,
}

/// Cache blobs, their recency and the byte budget.
#[derive(Default)]
pub(super) struct Cache {
    pub(super) entries: HashMap<Vec<u8>, CacheEntry>,
    /// Recency tick → key: the least recently used first.
    pub(super) lru: BTreeMap<u64, Vec<u8>>,
    pub(super) bytes: u64,
    pub(super) tick: u64,
    pub(super) budget: u64,
}

pub(super) struct CacheEntry {
    pub(super) value: Bytes,
    pub(super) expires_ms: u64,
    pub(super) tick: u64,
}

impl State {
    pub(super) fn is_queued(&self, record: &MutationRecord) -> bool {
        self.queues
            .get(&record.partition)
            .and_then(|q| q.get(&record.seq))
            .is_some_and(|k| *k == record.key)
    }

    pub(super) fn is_dead_letter(&self, record: &MutationRecord) -> bool {
        self.dead.get(&record.seq).is_some_and(|k| *k == record.key)
    }

    pub(super) fn holds(&self, partition: &str, instance: u64, token: u64) -> bool {
        self.leases.get(partition).is_some_and(|held| {
            held.instance == instance && held.token == token && held.until > Instant::now()
        })
    }

    pub(super) fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    pub(super) fn queue(&mut self, record: MutationRecord) {
        self.queues
            .entry(record.partition.clone())
            .or_default()
            .insert(record.seq, record.key.clone());
        self.records.insert(record.key.clone(), record);
    }

    pub(super) fn unqueue(&mut self, partition: &str, seq: u64) {
        if let Some(queue) = self.queues.get_mut(partition) {
            queue.remove(&seq);
            if queue.is_empty() {
                self.queues.remove(partition);
            }
        }
    }

    pub(super) fn keep_finished(&mut self, record: MutationRecord, at_ms: u64) {
        self.finished.insert((at_ms, record.key.clone()));
        self.records.insert(record.key.clone(), record);
    }

    pub(super) fn enqueue(&mut self, mut record: MutationRecord) -> Enqueued {
        if let Some(existing) = self.records.get(&record.key) {
            return Enqueued::Existing(Box::new(existing.clone()));
        }
        let seq = self.next_seq();
        record.seq = seq;
        self.queue(record);
        Enqueued::Accepted { seq }
    }

    /// [`crate::store::Queue::enqueue_coalesced`], whole under the lock.
    pub(super) fn enqueue_coalesced(
        &mut self,
        mut record: MutationRecord,
        folded: &MutationRecord,
        tail_seq: u64,
    ) -> Coalesced {
        if let Some(existing) = self.records.get(&record.key) {
            return Coalesced::Existing(Box::new(existing.clone()));
        }
        let leased = self
            .leases
            .get(&folded.partition)
            .is_some_and(|held| held.until > Instant::now());
        let tail = self
            .queues
            .get(&folded.partition)
            .and_then(|q| q.last_key_value())
            .map(|(seq, _)| *seq);
        if leased
            || tail != Some(tail_seq)
            || self.records.get(&folded.key) != Some(folded)
            || !self.is_queued(folded)
        {
            return Coalesced::Stale;
        }
        let now = now_ms();
        let mut old = folded.clone();
        old.mark_coalesced(now, &record.key);
        self.unqueue(&folded.partition, folded.seq);
        self.keep_finished(old, now);
        record.seq = folded.seq;
        record.partition = folded.partition.clone();
        self.queue(record);
        Coalesced::Folded { seq: folded.seq }
    }

    /// The newest `limit` pending items of `partition`, newest first.
    pub(super) fn peek_tail(&self, partition: &str, limit: usize) -> Vec<MutationRecord> {
        self.queues
            .get(partition)
            .into_iter()
            .flat_map(|q| q.values().rev())
            .filter_map(|k| self.records.get(k).cloned())
            .take(limit)
            .collect()
    }

    pub(super) fn record_forwarded(&mut self, record: MutationRecord) {
        if self.records.contains_key(&record.key) {
            return;
        }
        let at = record.finished_at_ms.unwrap_or_else(now_ms);
        self.keep_finished(record, at);
    }

    pub(super) fn finish(&mut self, record: &MutationRecord) {
        if !self.is_queued(record) {
            // Already finished (e.g. by an operator); keep what is stored.
            return;
        }
        self.unqueue(&record.partition, record.seq);
        let mut stored = record.clone();
        if record.goes_to_dead_letters() {
            self.dead.insert(record.seq, record.key.clone());
            self.records.insert(record.key.clone(), stored);
            return;
        }
        stored.forget_request();
        let at = record.finished_at_ms.unwrap_or_else(now_ms);
        self.keep_finished(stored, at);
    }

    /// Back to the tail of its partition; with `headers`, an operator's edit of its headers.
    pub(super) fn retry_dead_letter(
        &mut self,
        key: &str,
        headers: Option<Vec<(String, Bytes)>>,
    ) -> bool {
        let Some(mut record) = self.records.get(key).cloned() else {
            return false;
        };
        // Only what is on the dead-letter list (a forwarded mutation the upstream rejected
        // carries a dead-letter status but was answered directly).
        if !self.is_dead_letter(&record) {
            return false;
        }
        self.dead.remove(&record.seq);
        record.seq = self.next_seq();
        record.status = MutationStatus::Queued;
        record.attempts = 0;
        record.next_attempt_at_ms = 0;
        record.finished_at_ms = None;
        if let Some(headers) = headers {
            record.request.headers = headers;
        }
        self.queue(record);
        true
    }

    pub(super) fn retry_pending(&mut self, key: &str) -> bool {
        let Some(record) = self.records.get(key) else {
            return false;
        };
        if !record.status.is_pending() || !self.is_queued(record) {
            return false;
        }
        if let Some(record) = self.records.get_mut(key) {
            record.status = MutationStatus::Queued;
            record.next_attempt_at_ms = 0;
        }
        true
    }

    /// An operator's drop of a pending item or dead letter; with `superseded_by`, only of a
    /// dead letter, retried under that new key.
    pub(super) fn drop_mutation(&mut self, key: &str, superseded_by: Option<&str>) -> bool {
        let Some(mut record) = self.records.get(key).cloned() else {
            return false;
        };
        if superseded_by.is_none() && self.is_queued(&record) {
            self.unqueue(&record.partition, record.seq);
        } else if self.is_dead_letter(&record) {
            self.dead.remove(&record.seq);
        } else {
            return false;
        }
        let now = now_ms();
        match superseded_by {
            Some(new_key) => record.mark_superseded(now, new_key),
            None => record.mark_dropped(now),
        }
        self.keep_finished(record, now);
        true
    }

    pub(super) fn purge_finished(&mut self, before_ms: u64) -> u64 {
        let rest = self.finished.split_off(&(before_ms, String::new()));
        let expired = std::mem::replace(&mut self.finished, rest);
        let mut purged = 0;
        for (_, key) in expired {
            if self
                .records
                .get(&key)
                .is_some_and(|r| !r.status.is_pending())
            {
                self.records.remove(&key);
                purged += 1;
            }
        }
        purged
    }

    pub(super) fn peek(&self, partition: &str, limit: usize) -> Vec<MutationRecord> {
        self.peek_after(partition, 0, limit)
    }

    /// [`Self::peek`] of the items with a sequence number above `after`.
    pub(super) fn peek_after(
        &self,
        partition: &str,
        after: u64,
        limit: usize,
    ) -> Vec<MutationRecord> {
        let (Some(queue), Some(first)) = (self.queues.get(partition), after.checked_add(1)) else {
            return Vec::new();
        };
        queue
            .range(first..)
            .filter_map(|(_, key)| self.records.get(key).cloned())
            .take(limit)
            .collect()
    }

    /// Pending items per partition (a partition's queue is removed once empty).
    pub(super) fn partition_depths(&self) -> Vec<(String, u64)> {
        self.queues
            .iter()
            .map(|(p, q)| (p.clone(), q.len() as u64))
            .collect()
    }

    pub(super) fn queued_totals(&self) -> QueueTotals {
        let pending = self.queues.values().flat_map(|q| q.values());
        let mut totals = QueueTotals::default();
        for key in pending {
            totals.depth += 1;
            if let Some(r) = self.records.get(key) {
                totals.bytes += r.request.body.len() as u64;
            }
        }
        totals
    }

    pub(super) fn queue_stats(&self) -> QueueStats {
        let heads = self.queues.values().filter_map(|q| q.values().next());
        QueueStats {
            queue_depth: self.queues.values().map(|q| q.len() as u64).sum(),
            oldest_pending_ms: heads
                .filter_map(|key| self.records.get(key))
                .map(|r| r.accepted_at_ms)
                .min(),
            dead_letters: self.dead.len() as u64,
        }
    }
}

impl Cache {
    pub(super) fn get(&mut self, key: &[u8]) -> Option<Bytes> {
        let tick = self.tick + 1;
        let entry = self.entries.get_mut(key)?;
        if entry.expires_ms < now_ms() {
            return None;
        }
        // Recency only steers eviction.
        self.lru.remove(&entry.tick);
        entry.tick = tick;
        self.lru.insert(tick, key.to_vec());
        self.tick = tick;
        Some(entry.value.clone())
    }

    pub(super) fn put(&mut self, key: &[u8], value: Bytes, expires_ms: u64) {
        self.tick += 1;
        let len = value.len() as u64;
        let entry = CacheEntry {
            value,
            expires_ms,
            tick: self.tick,
        };
        if let Some(old) = self.entries.insert(key.to_vec(), entry) {
            self.lru.remove(&old.tick);
            self.bytes = self.bytes.saturating_sub(old.value.len() as u64);
        }
        self.lru.insert(self.tick, key.to_vec());
        self.bytes = self.bytes.saturating_add(len);
        // Evict least recently used entries until the budget holds.
        while self.bytes > self.budget {
            let Some((_, victim)) = self.lru.pop_first() else {
                break;
            };
            if let Some(old) = self.entries.remove(&victim) {
                self.bytes = self.bytes.saturating_sub(old.value.len() as u64);
            }
        }
    }
}
