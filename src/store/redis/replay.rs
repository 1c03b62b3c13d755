//! What the replaying instance does: find partitions with pending items, take a partition's
//! lease, read its head, and save each item's progress and answer under that lease.
//!
//! **Leases.** `acquire` takes a fencing token (`INCR P:fence`) and stores `<instance>:<token>` in
//! `P:T:lease` with `PX store.redis_lease`, unless another instance's value is there (a script;
//! `<instance>` is a random id per [`RedisStore`](super::RedisStore)). Acquiring a partition this
//! store already holds succeeds with a fresh token, which supersedes (fences off) the earlier
//! lease. `renew` extends and `release` deletes only while the stored value is ours (scripts).
//! `update` and `finish` check it *inside the same script* that writes (the `lease_guard.lua`
//! prelude), so an instance that was paused past its lease (GC, network partition) and lost the
//! partition gets [`StoreError::LeaseLost`] instead of overwriting its successor's work. A killed
//! instance's lease simply expires after `store.redis_lease` and another instance acquires it.
//! Expiry uses Redis's clock only; instance clocks do not matter.
//!
//! **On a cluster**, `P:fence` and the lease are on different shards. The lease is confirmed
//! with its own `WAIT` to its shard; the token is not: should `P:fence`'s shard fail over and
//! lose increments, a token may be handed out twice, but never in the same lease value, since
//! the value also holds the store's random instance id, and a lease is checked by its whole
//! value. What fencing needs (a lease that did not survive refuses its holder's writes) holds.
//!
//! **Across a Sentinel failover.** With `store.redis_min_replicas >= 1`, `acquire` returns a
//! lease only after `WAIT` saw a replica hold it and its `INCR`ed token, so the promoted replica
//! has both: the lease is still ours (or expires and is re-taken with a fresh, larger token),
//! and no other instance can take the partition meanwhile. Progress (`update`, `finish`) is
//! guarded by the lease value inside its script, so an instance whose lease did not survive the
//! failover gets [`StoreError::LeaseLost`] instead of writing. With 0 replicas a write the old
//! primary had not yet shipped can be lost, including a lease; the upstream's idempotency key
//! then dedups an item sent twice.

use redis::Value;

use super::Shared;
use super::answers::unexpected;
use super::scripts::{ACQUIRE, DELETE_IF, FINISH, RENEW, UPDATE};
use crate::store::codec::{decode, encode};
use crate::store::{Lease, MutationRecord, StoreError, now_ms};

impl Shared {
    /// What the lease key holds while `lease` is valid.
    fn lease_value(&self, lease: &Lease) -> String {
        format!("{}:{}", self.instance, lease.token)
    }

    pub(super) async fn pending_partitions_inner(&self) -> Result<Vec<String>, StoreError> {
        // The partitions with a non-zero depth: the same one-ZCARD-per-partition read.
        let depths = self.partition_depths_inner().await?;
        Ok(depths.into_iter().map(|(p, _)| p).collect())
    }

    pub(super) async fn peek_inner(
        &self,
        partition: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<MutationRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let pk = self.keys.partition(partition);
        let keys: Vec<String> = match after {
            // Scores are the sequence numbers: read on past `after` (exclusive).
            Some(after) => {
                redis::cmd("ZRANGEBYSCORE")
                    .arg(pk.queue())
                    .arg(format!("({after}"))
                    .arg("+inf")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit)
                    .query_async(&mut conn)
                    .await?
            }
            None => {
                redis::cmd("ZRANGE")
                    .arg(pk.queue())
                    .arg(0)
                    .arg(limit as i64 - 1)
                    .query_async(&mut conn)
                    .await?
            }
        };
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let record_keys: Vec<String> = keys.iter().map(|k| pk.record(k)).collect();
        // One slot, so MGET is fine on a cluster too.
        let blobs: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&record_keys)
            .query_async(&mut conn)
            .await?;
        blobs.into_iter().flatten().map(|b| decode(&b)).collect()
    }

    pub(super) async fn acquire_inner(&self, partition: &str) -> Result<Option<Lease>, StoreError> {
        // On the durable connection, followed by `WAIT`: with replicas required, a lease (and
        // its fencing token) is used only once a replica holds it, so a promoted replica
        // neither hands the partition to a second instance nor reissues a token.
        let mut conn = self.durable.clone();
        let token: u64 = redis::cmd("INCR")
            .arg(self.keys.fence())
            .query_async(&mut conn)
            .await?;
        let lease = Lease {
            partition: partition.to_string(),
            token,
        };
        let mut acquire = ACQUIRE.key(self.keys.partition(partition).lease());
        acquire
            .arg(self.lease_value(&lease))
            .arg(format!("{}:", self.instance))
            .arg(self.lease_ms);
        // On a cluster, `WAIT` travels with the lease to its shard (`cluster.rs`).
        let taken: i64 = self.invoke_confirmed(&mut conn, &acquire).await?;
        if taken != 1 {
            return Ok(None);
        }
        self.confirm_replicas(&mut conn).await?;
        Ok(Some(lease))
    }

    pub(super) async fn renew_inner(&self, lease: &Lease) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let renewed: i64 = RENEW
            .key(self.keys.partition(&lease.partition).lease())
            .arg(self.lease_value(lease))
            .arg(self.lease_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(renewed == 1)
    }

    pub(super) async fn release_inner(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = DELETE_IF
            .key(self.keys.partition(&lease.partition).lease())
            .arg(self.lease_value(lease))
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    pub(super) async fn update_inner(
        &self,
        lease: &Lease,
        record: &MutationRecord,
    ) -> Result<(), StoreError> {
        check_lease_partition(lease, record)?;
        let mut conn = self.conn.clone();
        let pk = self.keys.partition(&record.partition);
        let answer: i64 = UPDATE
            .key(pk.lease())
            .key(pk.record(&record.key))
            .key(pk.queue())
            .arg(self.lease_value(lease))
            .arg(&record.key)
            .arg(record.seq)
            .arg(encode(record)?)
            .invoke_async(&mut conn)
            .await?;
        lease_answer(lease, answer)?;
        if answer == 0 {
            return Err(StoreError::NotQueued {
                key: record.key.clone(),
            });
        }
        Ok(())
    }

    pub(super) async fn finish_inner(
        &self,
        lease: &Lease,
        record: &MutationRecord,
    ) -> Result<(), StoreError> {
        check_lease_partition(lease, record)?;
        let mut conn = self.conn.clone();
        let pk = self.keys.partition(&record.partition);
        let (list, score, blob) = if record.goes_to_dead_letters() {
            (pk.dead(), record.seq, encode(record)?)
        } else {
            let mut stored = record.clone();
            stored.forget_request();
            let at = record.finished_at_ms.unwrap_or_else(now_ms);
            (pk.done(), at, encode(&stored)?)
        };
        let answer: i64 = FINISH
            .key(pk.lease())
            .key(pk.record(&record.key))
            .key(pk.queue())
            .key(list)
            .key(pk.queued_bytes())
            .arg(self.lease_value(lease))
            .arg(&record.key)
            .arg(record.seq)
            .arg(blob)
            .arg(score)
            .arg(record.request.body.len())
            .invoke_async(&mut conn)
            .await?;
        lease_answer(lease, answer)
    }
}

/// A store call with a lease of another partition is a caller bug; refuse it before writing.
fn check_lease_partition(lease: &Lease, record: &MutationRecord) -> Result<(), StoreError> {
    if lease.partition == record.partition {
        return Ok(());
    }
    Err(StoreError::LeaseLost {
        partition: record.partition.clone(),
    })
}

/// Map a lease-checked script's answer: -1 lease lost, 0 nothing to do, 1 written.
fn lease_answer(lease: &Lease, answer: i64) -> Result<(), StoreError> {
    match answer {
        -1 => Err(StoreError::LeaseLost {
            partition: lease.partition.clone(),
        }),
        0 | 1 => Ok(()),
        other => Err(unexpected("lease-checked write", &Value::Int(other))),
    }
}
