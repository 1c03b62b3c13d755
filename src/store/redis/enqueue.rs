//! Accepting mutations: enqueue, and the records of forwarded ones, both found again by key
//! through the key index `P:k:<key>`.
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
//! *With a cluster* (`cluster.rs`), the steps' commands go to the slots of their keys; when
//! replicas must confirm, each write of steps 1, 2 and 4 carries its own `WAIT` to its shard
//! (instead of one `WAIT` at the end), and a 202 waits for all of them. Step 3's counter needs
//! no confirmation: a counter that went back in a failover is raised to the partition's tail
//! when a write is refused for it (`raise.lua`).
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

use std::sync::Arc;
use std::time::Duration;

use super::primary::Conn;
use redis::{ErrorKind, Value};
use tokio::sync::oneshot;

use super::answers::{copy_error, redis_error, timed_out, unexpected};
use super::scripts::{ENQUEUE, RAISE, RECORD_FORWARDED, REPLACE_IF};
use super::{CALL_DEADLINE, RedisStore, Shared};
use crate::store::codec::{decode, encode};
use crate::store::{Enqueued, MutationRecord, StoreError, now_ms};

/// New sequence numbers tried when concurrent enqueues into one partition keep overtaking.
pub(super) const SEQ_ATTEMPTS: usize = 16;
/// Looks for the record of a key claimed for another partition before taking the claim over.
const CLAIM_ATTEMPTS: usize = 5;
/// Pause between those looks.
const CLAIM_BACKOFF: Duration = Duration::from_millis(25);

/// An open answer per record of a round: `None` until the record is claimed elsewhere, stored
/// or found.
type Answers = Vec<Option<Result<Enqueued, StoreError>>>;

/// How a key claim ended.
pub(super) enum Claim {
    /// The key's index points to our partition: its script decides.
    Ours,
    /// Another partition holds a record under this key.
    Existing(Box<MutationRecord>),
}

/// The waiting list of enqueues and its writer flag, under one lock.
#[derive(Default)]
pub(super) struct EnqueueQueue {
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

impl RedisStore {
    /// Join the next group write and wait for its answer (module docs, "Enqueue").
    ///
    /// One writer task at a time takes everything waiting, writes it as one group, and goes
    /// on while more is waiting; callers only queue and wait. (A lock that every caller took
    /// in turn made groups of one under load: each caller whose record an earlier group had
    /// already written still held the lock for a round of its own.)
    pub(super) async fn enqueue_grouped(
        &self,
        record: MutationRecord,
    ) -> Result<Enqueued, StoreError> {
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
    /// Make sure `key` is enqueued (or recorded) under `partition` and no other (module docs).
    pub(super) async fn claim(
        &self,
        conn: &mut Conn,
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
        // (1) Claim every key: one round trip when none is taken.
        let mut answers = self.claim_keys(&mut conn, &records).await?;
        // (2) Register the partitions before writing to them.
        let mut partitions: Vec<&str> = records.iter().map(|r| r.partition.as_str()).collect();
        partitions.sort_unstable();
        partitions.dedup();
        for p in partitions {
            self.register(&mut conn, p).await?;
        }
        // (3, 4) Number the rest in order and write them.
        let accepted = self
            .number_and_write(&mut conn, &mut records, &mut answers)
            .await?;
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

    /// Step (1): claim every key (`SET NX`, all sent at once: one pipeline on one primary,
    /// each to its slot on a cluster, with its `WAIT` when replicas must confirm). A key already
    /// claimed is settled by [`Self::claim`]; one another partition holds a record under
    /// answers with that record.
    async fn claim_keys(
        &self,
        conn: &mut Conn,
        records: &[MutationRecord],
    ) -> Result<Answers, StoreError> {
        let mut answers: Answers = records.iter().map(|_| None).collect();
        let claims = records.iter().map(|r| {
            let mut conn = conn.clone();
            let mut set = redis::cmd("SET");
            set.arg(self.keys.index(&r.key)).arg(&r.partition).arg("NX");
            async move { self.query_confirmed::<Value>(&mut conn, &set).await }
        });
        let claimed = futures_util::future::join_all(claims).await;
        for (i, set) in claimed.into_iter().enumerate() {
            if matches!(set?, Value::Okay) {
                continue;
            }
            let r = &records[i];
            if let Claim::Existing(existing) = self.claim(conn, &r.key, &r.partition).await? {
                answers[i] = Some(Ok(Enqueued::Existing(existing)));
            }
        }
        Ok(answers)
    }

    /// Steps (3) and (4): number the records still open in order (`INCRBY`) and write them,
    /// one script per partition; a partition whose queue got a higher number meanwhile
    /// (another instance) is renumbered and written again. True when a record was stored.
    async fn number_and_write(
        &self,
        conn: &mut Conn,
        records: &mut [MutationRecord],
        answers: &mut Answers,
    ) -> Result<bool, StoreError> {
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
                .query_async(conn)
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
            let results = self.write_partitions(conn, records, &groups).await;
            todo.clear();
            for ((partition, members), result) in groups.into_iter().zip(results) {
                match result? {
                    Value::Int(0) => {
                        tracing::debug!(partition, "overtaken by another instance; renumbering");
                        self.raise_seq_to_tail(conn, &partition).await?;
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
        Ok(accepted)
    }

    /// One `ENQUEUE` script per partition's `members` (numbered records), all at once: concurrent
    /// on the multiplexed connection, they travel as one pipeline. One answer per partition.
    async fn write_partitions(
        &self,
        conn: &Conn,
        records: &[MutationRecord],
        groups: &[(String, Vec<usize>)],
    ) -> Vec<Result<Value, StoreError>> {
        let writes = groups.iter().map(|(partition, members)| {
            let mut conn = conn.clone();
            async move {
                let pk = self.keys.partition(partition);
                let mut write = ENQUEUE.key(pk.queue());
                for &i in members {
                    write
                        .key(pk.record(&records[i].key))
                        .arg(&records[i].key)
                        .arg(records[i].seq)
                        .arg(encode(&records[i])?)
                        .arg(records[i].request.body.len());
                }
                write.key(pk.queued_bytes());
                let answer: Value = self.invoke_confirmed(&mut conn, &write).await?;
                Ok::<_, StoreError>(answer)
            }
        });
        futures_util::future::join_all(writes).await
    }

    /// After an overtaken write: make sure `P:seq` is above `partition`'s tail, so that the
    /// next numbers can be appended. Normally it already is (another instance numbered later);
    /// it is not when the shard holding `P:seq` failed over and lost increments.
    pub(super) async fn raise_seq_to_tail(
        &self,
        conn: &mut Conn,
        partition: &str,
    ) -> Result<(), StoreError> {
        let tail: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(self.keys.partition(partition).queue())
            .arg(-1)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(conn)
            .await?;
        if let Some((_, score)) = tail.first() {
            let raised: i64 = RAISE
                .key(self.keys.seq())
                .arg(*score as u64)
                .invoke_async(conn)
                .await?;
            if raised == 1 {
                tracing::warn!(
                    partition,
                    tail = score,
                    "sequence counter was behind; raised"
                );
            }
        }
        Ok(())
    }

    pub(super) async fn record_forwarded_inner(
        &self,
        record: MutationRecord,
    ) -> Result<(), StoreError> {
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

    pub(super) async fn mutation_inner(
        &self,
        key: &str,
    ) -> Result<Option<MutationRecord>, StoreError> {
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

    /// Whether `partition`'s queue holds anything (a new mutation must then queue behind it).
    pub(super) async fn partition_has_pending_inner(
        &self,
        partition: &str,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let n: u64 = redis::cmd("ZCARD")
            .arg(self.keys.partition(partition).queue())
            .query_async(&mut conn)
            .await?;
        Ok(n > 0)
    }
}
