//! What the operator does through the admin API (dead letters, retry, edit, drop) and what the
//! status page and metrics read (queue depth, oldest pending item, dead letters, depth per
//! partition).
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
//! **Edits.** An operator's edit of a dead letter
//! ([`DeadLetterEdit`](crate::store::DeadLetterEdit)) is one of two: a retry that also replaces
//! the request headers (same key, same script as a retry), or, when the body was edited and
//! enqueued under a new key, a drop of the dead letter only (`DROP` with `dead`: never of a
//! pending item) whose outcome names that key.

use super::primary::Conn;
use bytes::Bytes;
use redis::{ErrorKind, Value};

use super::Shared;
use super::answers::{parse, redis_error, scored, unexpected};
use super::enqueue::SEQ_ATTEMPTS;
use super::scripts::{DROP, RETRY_DEAD, RETRY_PENDING};
use crate::store::codec::{decode, encode};
use crate::store::{MutationRecord, MutationStatus, QueueStats, QueueTotals, StoreError, now_ms};

/// Reads of a record for an operator's compare-and-set write, when it keeps changing between
/// the read and the write (the replayer saving its progress).
const CAS_ATTEMPTS: usize = 8;

impl Shared {
    async fn next_seq(&self, conn: &mut Conn) -> Result<u64, StoreError> {
        Ok(redis::cmd("INCR")
            .arg(self.keys.seq())
            .query_async(conn)
            .await?)
    }

    pub(super) async fn dead_letters_inner(
        &self,
        limit: usize,
    ) -> Result<Vec<MutationRecord>, StoreError> {
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

    /// Back to the tail of its partition; with `headers`, an operator's edit of its headers.
    pub(super) async fn retry_dead_letter_inner(
        &self,
        key: &str,
        headers: Option<Vec<(String, Bytes)>>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.durable.clone();
        let Some(mut record) = self.mutation_inner(key).await? else {
            return Ok(false);
        };
        if !record.status.is_dead_letter() {
            return Ok(false);
        }
        if let Some(headers) = headers {
            record.request.headers = headers;
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
            let mut retry = RETRY_DEAD.key(pk.record(key));
            retry
                .key(pk.queue())
                .key(pk.dead())
                .key(pk.queued_bytes())
                .arg(key)
                .arg(old_seq)
                .arg(seq)
                .arg(encode(&record)?)
                .arg(record.request.body.len());
            let answer: i64 = self.invoke_confirmed(&mut conn, &retry).await?;
            match answer {
                1 => {
                    self.confirm_replicas(&mut conn).await?;
                    return Ok(true);
                }
                0 => return Ok(false),
                -2 => {
                    self.raise_seq_to_tail(&mut conn, &record.partition).await?;
                    continue;
                }
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
        conn: &mut Conn,
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
    pub(super) async fn retry_pending_inner(&self, key: &str) -> Result<bool, StoreError> {
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
            let mut retry = RETRY_PENDING.key(pk.record(key));
            retry
                .key(pk.queue())
                .arg(key)
                .arg(record.seq)
                .arg(&blob)
                .arg(encode(&record)?);
            let answer: i64 = self.invoke_confirmed(&mut conn, &retry).await?;
            match self
                .operator_answer(&mut conn, "retry_pending", answer)
                .await?
            {
                Some(done) => return Ok(done),
                None => continue,
            }
        }
        Err(kept_changing("retry_pending", key))
    }

    /// Operator's drop of a pending item or a dead letter (no lease, as for
    /// [`Self::retry_pending_inner`]). The replayer's later `update`/`finish` of a dropped item
    /// find it gone from the queue and change nothing. With `superseded_by`, only a dead letter,
    /// retried under that new key.
    pub(super) async fn drop_mutation_inner(
        &self,
        key: &str,
        superseded_by: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.durable.clone();
        for _ in 0..CAS_ATTEMPTS {
            let Some((partition, blob)) = self.raw_record(&mut conn, key).await? else {
                return Ok(false);
            };
            let mut record = decode(&blob)?;
            let body_bytes = record.request.body.len();
            // Cheap pre-filter; the script decides by the queue and dead-letter lists (a
            // forwarded record may carry a dead-letter status without being on the list).
            let droppable = match superseded_by {
                Some(_) => record.status.is_dead_letter(),
                None => record.status.is_pending() || record.status.is_dead_letter(),
            };
            if !droppable {
                return Ok(false);
            }
            let now = now_ms();
            match superseded_by {
                Some(new_key) => record.mark_superseded(now, new_key),
                None => record.mark_dropped(now),
            }
            let pk = self.keys.partition(&partition);
            let mut drop = DROP.key(pk.record(key));
            drop.key(pk.queue())
                .key(pk.dead())
                .key(pk.done())
                .key(pk.queued_bytes())
                .arg(key)
                .arg(record.seq)
                .arg(&blob)
                .arg(encode(&record)?)
                .arg(now)
                .arg(if superseded_by.is_some() {
                    "dead"
                } else {
                    "any"
                })
                .arg(body_bytes);
            let answer: i64 = self.invoke_confirmed(&mut conn, &drop).await?;
            match self
                .operator_answer(&mut conn, "drop_mutation", answer)
                .await?
            {
                Some(done) => return Ok(done),
                None => continue,
            }
        }
        Err(kept_changing("drop_mutation", key))
    }

    /// What a compare-and-set operator script answered: `Some(true)` done (once the replicas
    /// confirm it), `Some(false)` nothing to do, `None` the record changed meanwhile (read it
    /// again).
    async fn operator_answer(
        &self,
        conn: &mut Conn,
        what: &'static str,
        answer: i64,
    ) -> Result<Option<bool>, StoreError> {
        match answer {
            1 => {
                self.confirm_replicas(conn).await?;
                Ok(Some(true))
            }
            0 => Ok(Some(false)),
            -1 => Ok(None),
            other => Err(unexpected(what, &Value::Int(other))),
        }
    }

    /// Pending items per partition that holds any: one `ZCARD` per registered partition.
    pub(super) async fn partition_depths_inner(&self) -> Result<Vec<(String, u64)>, StoreError> {
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
            .map(|((p, _), n)| (p, n))
            .collect())
    }

    /// Pending items (`ZCARD` of each queue) and their body bytes (each `qb` counter) of every
    /// registered partition, in one pipeline.
    pub(super) async fn queued_totals_inner(&self) -> Result<QueueTotals, StoreError> {
        let mut conn = self.conn.clone();
        let registry = self.registry(&mut conn).await?;
        let mut totals = QueueTotals::default();
        if registry.is_empty() {
            return Ok(totals);
        }
        let mut pipe = redis::pipe();
        for (p, _) in &registry {
            let pk = self.keys.partition(p);
            pipe.cmd("ZCARD").arg(pk.queue());
            pipe.cmd("GET").arg(pk.queued_bytes());
        }
        let answers: Vec<(u64, Option<i64>)> = pipe.query_async(&mut conn).await?;
        for (depth, bytes) in answers {
            totals.depth += depth;
            totals.bytes += bytes.map_or(0, |b| u64::try_from(b).unwrap_or(0));
        }
        Ok(totals)
    }

    pub(super) async fn queue_stats_inner(&self) -> Result<QueueStats, StoreError> {
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
}

/// A compare-and-set write that lost [`CAS_ATTEMPTS`] times in a row.
fn kept_changing(what: &'static str, key: &str) -> StoreError {
    redis_error(
        ErrorKind::Client,
        "record kept changing",
        format!("{what} of {key:?} lost {CAS_ATTEMPTS} compare-and-set attempts"),
    )
}
