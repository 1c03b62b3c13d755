//! The embedded queue: the [`Queue`] role over the `mutations`, `queue`, `dead` and `finished`
//! tables. Writes are transactions the writer thread applies in its group commits (each
//! returns the [`Effect`] on the in-memory counters); reads open their own read transaction.

use async_trait::async_trait;
use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, WriteTransaction};

use super::tables::Tables;
use super::writer::{Effect, Op};
use super::{DEAD, EmbeddedStore, FINISHED, META, MUTATIONS, QUEUE, current};
use crate::store::codec::{self, decode, encode};
use crate::store::{
    Coalesced, DeadLetterEdit, Enqueued, Lease, MutationRecord, MutationStatus, Queue, QueueStats,
    QueueTotals, StoreError, now_ms,
};

fn get_record(db: &Database, key: &str) -> Result<Option<MutationRecord>, StoreError> {
    let read = db.begin_read()?;
    let table = read.open_table(MUTATIONS)?;
    let value = table.get(key)?;
    value.map(|v| decode(v.value())).transpose()
}

#[async_trait]
impl Queue for EmbeddedStore {
    async fn enqueue(&self, record: MutationRecord) -> Result<Enqueued, StoreError> {
        self.call(|r| Op::Enqueue(Box::new(record), r)).await
    }

    async fn enqueue_coalesced(
        &self,
        record: MutationRecord,
        folded: &MutationRecord,
        tail_seq: u64,
    ) -> Result<Coalesced, StoreError> {
        // Held for reading until the write is durable: a replayer's `acquire` (which takes it
        // for writing) waits for it, so its first peek sees the folded state; and while a
        // replayer holds the partition nothing is folded.
        let drains = self.drains.read().await;
        if drains.get(&folded.partition).is_some_and(|n| *n > 0) {
            return Ok(match self.mutation(&record.key).await? {
                Some(existing) => Coalesced::Existing(Box::new(existing)),
                None => Coalesced::Stale,
            });
        }
        let pair = Box::new((record, folded.clone()));
        let result = self.call(|r| Op::Coalesce(pair, tail_seq, r)).await;
        drop(drains);
        result
    }

    async fn peek_tail(
        &self,
        partition: &str,
        limit: usize,
    ) -> Result<Vec<MutationRecord>, StoreError> {
        let partition = partition.to_string();
        self.read(move |db| {
            let read = db.begin_read()?;
            let queue = read.open_table(QUEUE)?;
            let mutations = read.open_table(MUTATIONS)?;
            let mut out = Vec::new();
            for item in queue
                .range((partition.as_str(), 0)..=(partition.as_str(), u64::MAX))?
                .rev()
            {
                if out.len() >= limit {
                    break;
                }
                let (_, key) = item?;
                if let Some(v) = mutations.get(key.value())? {
                    out.push(decode(v.value())?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn record_forwarded(&self, record: MutationRecord) -> Result<(), StoreError> {
        self.call(|r| Op::RecordForwarded(Box::new(record), r))
            .await
    }

    async fn mutation(&self, key: &str) -> Result<Option<MutationRecord>, StoreError> {
        let key = key.to_string();
        self.read(move |db| get_record(db, &key)).await
    }

    async fn pending_partitions(&self) -> Result<Vec<String>, StoreError> {
        let counters = self.counters.lock().map_err(|_| StoreError::Closed)?;
        Ok(counters
            .pending
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(p, _)| p.clone())
            .collect())
    }

    async fn partition_has_pending(&self, partition: &str) -> Result<bool, StoreError> {
        let counters = self.counters.lock().map_err(|_| StoreError::Closed)?;
        Ok(counters.pending.get(partition).is_some_and(|n| *n > 0))
    }

    async fn peek(&self, partition: &str, limit: usize) -> Result<Vec<MutationRecord>, StoreError> {
        self.peek_after(partition, 0, limit).await
    }

    async fn peek_after(
        &self,
        partition: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<MutationRecord>, StoreError> {
        let partition = partition.to_string();
        self.read(move |db| {
            let mut out = Vec::new();
            let Some(first) = after.checked_add(1) else {
                return Ok(out);
            };
            if limit == 0 {
                return Ok(out);
            }
            let read = db.begin_read()?;
            let queue = read.open_table(QUEUE)?;
            let mutations = read.open_table(MUTATIONS)?;
            for item in queue.range((partition.as_str(), first)..=(partition.as_str(), u64::MAX))? {
                let (_, key) = item?;
                if let Some(v) = mutations.get(key.value())? {
                    out.push(decode(v.value())?);
                }
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    fn writable(&self) -> bool {
        current(&self.db).is_ok()
    }

    async fn update(&self, _lease: &Lease, record: &MutationRecord) -> Result<(), StoreError> {
        self.call(|r| Op::Update(Box::new(record.clone()), r)).await
    }

    async fn finish(&self, _lease: &Lease, record: &MutationRecord) -> Result<(), StoreError> {
        self.call(|r| Op::Finish(Box::new(record.finished_copy()), r))
            .await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<MutationRecord>, StoreError> {
        self.read(move |db| {
            let read = db.begin_read()?;
            let dead = read.open_table(DEAD)?;
            let mutations = read.open_table(MUTATIONS)?;
            let mut out = Vec::new();
            for item in dead.iter()?.take(limit) {
                let (_, key) = item?;
                if let Some(v) = mutations.get(key.value())? {
                    out.push(decode(v.value())?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn retry_dead_letter(&self, key: &str) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.call(|r| Op::RetryDeadLetter(key, r)).await
    }

    async fn retry_pending(&self, key: &str) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.call(|r| Op::RetryPending(key, r)).await
    }

    async fn drop_mutation(&self, key: &str) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.call(|r| Op::Drop(key, r)).await
    }

    async fn edit_dead_letter(&self, key: &str, edit: DeadLetterEdit) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.call(|r| Op::EditDeadLetter(key, edit, r)).await
    }

    async fn purge_finished(&self, before_ms: u64) -> Result<u64, StoreError> {
        self.call(|r| Op::Purge(before_ms, r)).await
    }

    async fn partition_depths(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let counters = self.counters.lock().map_err(|_| StoreError::Closed)?;
        Ok(counters
            .pending
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(p, n)| (p.clone(), *n))
            .collect())
    }

    async fn queued_totals(&self) -> Result<QueueTotals, StoreError> {
        let c = self.counters.lock().map_err(|_| StoreError::Closed)?;
        Ok(QueueTotals {
            depth: c.pending.values().sum(),
            bytes: c.pending_bytes,
        })
    }

    async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        let (depth, partitions, dead) = {
            let c = self.counters.lock().map_err(|_| StoreError::Closed)?;
            (
                c.pending.values().sum::<u64>(),
                c.pending
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(p, _)| p.clone())
                    .collect::<Vec<_>>(),
                c.dead_letters,
            )
        };
        let oldest = self
            .read(move |db| {
                let read = db.begin_read()?;
                let queue = read.open_table(QUEUE)?;
                let mutations = read.open_table(MUTATIONS)?;
                let mut oldest: Option<u64> = None;
                for p in &partitions {
                    let first = queue
                        .range((p.as_str(), 0)..=(p.as_str(), u64::MAX))?
                        .next()
                        .transpose()?;
                    if let Some((_, key)) = first
                        && let Some(v) = mutations.get(key.value())?
                    {
                        let at = decode(v.value())?.accepted_at_ms;
                        oldest = Some(oldest.map_or(at, |o| o.min(at)));
                    }
                }
                Ok(oldest)
            })
            .await?;
        Ok(QueueStats {
            queue_depth: depth,
            oldest_pending_ms: oldest,
            dead_letters: dead,
        })
    }
}

/// The store-wide sequence counter (`meta.seq`) as the writer keeps it: read from the table
/// once, then counted in memory and written back once per commit ([`Seq::save`]) instead of
/// read and written by every enqueue. Forgotten when a commit fails, so that it is read again
/// from what is stored.
#[derive(Debug, Default)]
pub(super) struct Seq {
    /// The last number given out (`None`: read it from the table).
    last: Option<u64>,
    /// Given out since the last save.
    dirty: bool,
}

impl Seq {
    /// The next sequence number.
    pub(super) fn next(&mut self, t: &mut Tables<'_>) -> Result<u64, StoreError> {
        let last = match self.last {
            Some(last) => last,
            None => t.meta()?.get("seq")?.map(|v| v.value()).unwrap_or(0),
        };
        let seq = last + 1;
        self.last = Some(seq);
        self.dirty = true;
        Ok(seq)
    }

    /// Write the counter into `txn` (before it commits), if numbers were given out.
    pub(super) fn save(&mut self, txn: &WriteTransaction) -> Result<(), redb::Error> {
        if let (true, Some(last)) = (self.dirty, self.last) {
            txn.open_table(META)?.insert("seq", last)?;
        }
        self.dirty = false;
        Ok(())
    }

    /// Read the counter from the table next time (its last save may not have been committed).
    pub(super) fn forget(&mut self) {
        *self = Self::default();
    }
}

/// Store `record` under its key.
fn put_record(t: &mut Tables<'_>, record: &MutationRecord) -> Result<(), StoreError> {
    let bytes = encode(record)?;
    t.mutations()?
        .insert(record.key.as_str(), bytes.as_slice())?;
    Ok(())
}

pub(super) fn enqueue(
    t: &mut Tables<'_>,
    seqs: &mut Seq,
    mut record: MutationRecord,
) -> Result<(Effect, Enqueued), StoreError> {
    if let Some(existing) = t.mutations()?.get(record.key.as_str())? {
        return Ok((
            Effect::None,
            Enqueued::Existing(Box::new(decode(existing.value())?)),
        ));
    }
    let seq = seqs.next(t)?;
    record.seq = seq;
    put_record(t, &record)?;
    t.queue()?
        .insert((record.partition.as_str(), seq), record.key.as_str())?;
    Ok((
        Effect::Queued(record.partition.clone(), body_len(&record)),
        Enqueued::Accepted { seq },
    ))
}

/// [`Queue::enqueue_coalesced`] as one transaction (the lease check is the caller's: see
/// [`EmbeddedStore`]'s `drains`).
pub(super) fn enqueue_coalesced(
    t: &mut Tables<'_>,
    mut record: MutationRecord,
    folded: &MutationRecord,
    tail_seq: u64,
) -> Result<Coalesced, StoreError> {
    if let Some(existing) = get_for_update(t, &record.key)? {
        return Ok(Coalesced::Existing(Box::new(existing)));
    }
    let tail = t
        .queue()?
        .range((folded.partition.as_str(), 0)..=(folded.partition.as_str(), u64::MAX))?
        .next_back()
        .transpose()?
        .map(|(k, _)| k.value().1);
    if tail != Some(tail_seq)
        || get_for_update(t, &folded.key)?.as_ref() != Some(folded)
        || !is_queued(t, folded)?
    {
        return Ok(Coalesced::Stale);
    }
    let now = now_ms();
    let mut old = folded.clone();
    old.mark_coalesced(now, &record.key);
    put_record(t, &old)?;
    t.finished()?.insert((now, old.key.as_str()), ())?;
    record.seq = folded.seq;
    record.partition = folded.partition.clone();
    put_record(t, &record)?;
    // The same (partition, seq) slot now names the new key.
    t.queue()?
        .insert((record.partition.as_str(), record.seq), record.key.as_str())?;
    Ok(Coalesced::Folded { seq: record.seq })
}

/// Save a pending item's new state, only while it is still on its queue under the same
/// sequence number: an item an operator dropped (or that was finished) is never written back.
pub(super) fn update(t: &mut Tables<'_>, record: &MutationRecord) -> Result<(), StoreError> {
    if !is_queued(t, record)? {
        return Err(StoreError::NotQueued {
            key: record.key.clone(),
        });
    }
    put_record(t, record)
}

pub(super) fn record_forwarded(
    t: &mut Tables<'_>,
    record: &MutationRecord,
) -> Result<(), StoreError> {
    if t.mutations()?.get(record.key.as_str())?.is_some() {
        return Ok(());
    }
    put_record(t, record)?;
    let at = record.finished_at_ms.unwrap_or_else(now_ms);
    t.finished()?.insert((at, record.key.as_str()), ())?;
    Ok(())
}

pub(super) fn finish(t: &mut Tables<'_>, mut record: MutationRecord) -> Result<Effect, StoreError> {
    let removed = t
        .queue()?
        .remove((record.partition.as_str(), record.seq))?
        .is_some();
    if !removed {
        // Already finished (e.g. by an operator); keep what is stored.
        return Ok(Effect::None);
    }
    // The queued bytes go down by the body that was queued (the caller's copy may have
    // forgotten it already).
    let bytes = t
        .mutations()?
        .get(record.key.as_str())?
        .map(|v| codec::body_len(v.value()))
        .transpose()?
        .unwrap_or(0);
    if record.goes_to_dead_letters() {
        put_record(t, &record)?;
        t.dead()?.insert(record.seq, record.key.as_str())?;
        return Ok(Effect::DeadLettered(record.partition, bytes));
    }
    record.forget_request();
    put_record(t, &record)?;
    let at = record.finished_at_ms.unwrap_or_else(now_ms);
    t.finished()?.insert((at, record.key.as_str()), ())?;
    Ok(Effect::Unqueued(record.partition, bytes))
}

/// The body bytes a pending record counts for in the queue's totals.
pub(super) fn body_len(record: &MutationRecord) -> u64 {
    record.request.body.len() as u64
}

/// Back to the tail of its partition; with `headers`, an operator's edit of its headers.
pub(super) fn retry_dead_letter(
    t: &mut Tables<'_>,
    seqs: &mut Seq,
    key: &str,
    headers: Option<Vec<(String, Bytes)>>,
) -> Result<Option<Effect>, StoreError> {
    let Some(mut record) = get_for_update(t, key)? else {
        return Ok(None);
    };
    // Only what is on the dead-letter list (a forwarded mutation the upstream rejected has a
    // dead-letter status but was answered to the app directly: nothing to retry).
    if !is_dead_letter(t, &record)? {
        return Ok(None);
    }
    t.dead()?.remove(record.seq)?;
    let seq = seqs.next(t)?;
    record.seq = seq;
    record.status = MutationStatus::Queued;
    record.attempts = 0;
    record.next_attempt_at_ms = 0;
    record.finished_at_ms = None;
    if let Some(headers) = headers {
        record.request.headers = headers;
    }
    put_record(t, &record)?;
    t.queue()?.insert((record.partition.as_str(), seq), key)?;
    let bytes = body_len(&record);
    Ok(Some(Effect::DeadRevived(record.partition, bytes)))
}

fn is_dead_letter(t: &mut Tables<'_>, record: &MutationRecord) -> Result<bool, StoreError> {
    Ok(t.dead()?
        .get(record.seq)?
        .is_some_and(|k| k.value() == record.key))
}

fn is_queued(t: &mut Tables<'_>, record: &MutationRecord) -> Result<bool, StoreError> {
    Ok(t.queue()?
        .get((record.partition.as_str(), record.seq))?
        .is_some_and(|k| k.value() == record.key))
}

fn get_for_update(t: &mut Tables<'_>, key: &str) -> Result<Option<MutationRecord>, StoreError> {
    t.mutations()?
        .get(key)?
        .map(|v| decode(v.value()))
        .transpose()
}

pub(super) fn retry_pending(t: &mut Tables<'_>, key: &str) -> Result<bool, StoreError> {
    let Some(mut record) = get_for_update(t, key)? else {
        return Ok(false);
    };
    if !record.status.is_pending() || !is_queued(t, &record)? {
        return Ok(false);
    }
    record.status = MutationStatus::Queued;
    record.next_attempt_at_ms = 0;
    put_record(t, &record)?;
    Ok(true)
}

/// An operator's drop of a pending item or dead letter; with `superseded_by`, only of a dead
/// letter, retried under that new key.
pub(super) fn drop_mutation(
    t: &mut Tables<'_>,
    key: &str,
    superseded_by: Option<&str>,
) -> Result<Option<Effect>, StoreError> {
    let Some(mut record) = get_for_update(t, key)? else {
        return Ok(None);
    };
    let effect = if superseded_by.is_none() && is_queued(t, &record)? {
        t.queue()?.remove((record.partition.as_str(), record.seq))?;
        Effect::Unqueued(record.partition.clone(), body_len(&record))
    } else if is_dead_letter(t, &record)? {
        t.dead()?.remove(record.seq)?;
        Effect::DeadDropped
    } else {
        return Ok(None);
    };
    let now = now_ms();
    match superseded_by {
        Some(new_key) => record.mark_superseded(now, new_key),
        None => record.mark_dropped(now),
    }
    put_record(t, &record)?;
    t.finished()?.insert((now, key), ())?;
    Ok(Some(effect))
}

pub(super) fn purge(t: &mut Tables<'_>, before_ms: u64) -> Result<u64, StoreError> {
    // Both tables at once: opened here, on the transaction.
    let txn = t.txn();
    let mut finished = txn.open_table(FINISHED)?;
    let mut mutations = txn.open_table(MUTATIONS)?;
    let mut purged = 0;
    let expired: Vec<(u64, String)> = finished
        .range((0, "")..(before_ms, ""))?
        .map(|item| item.map(|(k, _)| (k.value().0, k.value().1.to_string())))
        .collect::<Result<_, _>>()?;
    for (at, key) in expired {
        finished.remove((at, key.as_str()))?;
        let finished_record = mutations
            .get(key.as_str())?
            .map(|v| decode(v.value()))
            .transpose()?
            .is_some_and(|r| !r.status.is_pending());
        if finished_record {
            mutations.remove(key.as_str())?;
            purged += 1;
        }
    }
    Ok(purged)
}
