//! Coalescing (route `coalesce = true`): a new mutation takes the place of a pending one of the
//! same URI, which is finished as `coalesced`.
//!
//! Records are postcard blobs that Lua cannot read, so the caller decides in Rust what to fold
//! (from [`Shared::peek_tail_inner`]) and the `COALESCE` script applies it only if nothing it
//! decided on changed: the folded record is still the blob read and on the queue with its
//! sequence number, the queue's tail is still the one seen, and no instance holds the
//! partition's lease (a replayer could have the folded item in flight or in its batch). The new
//! key is claimed in the key index first, as an enqueue claims it. Confirmed by replicas like
//! an enqueue.

use redis::Value;

use super::Shared;
use super::answers::unexpected;
use super::enqueue::Claim;
use super::scripts::COALESCE;
use crate::store::codec::{decode, encode};
use crate::store::{Coalesced, MutationRecord, StoreError, now_ms};

impl Shared {
    pub(super) async fn coalesce_inner(
        &self,
        mut record: MutationRecord,
        folded: &MutationRecord,
        tail_seq: u64,
    ) -> Result<Coalesced, StoreError> {
        let mut conn = self.durable.clone();
        let partition = folded.partition.clone();
        if let Claim::Existing(existing) = self.claim(&mut conn, &record.key, &partition).await? {
            return Ok(Coalesced::Existing(existing));
        }
        let pk = self.keys.partition(&partition);
        let blob: Option<Vec<u8>> = redis::cmd("GET")
            .arg(pk.record(&folded.key))
            .query_async(&mut conn)
            .await?;
        let Some(blob) = blob else {
            return Ok(Coalesced::Stale);
        };
        if decode(&blob)? != *folded {
            return Ok(Coalesced::Stale);
        }
        let now = now_ms();
        let mut old = folded.clone();
        old.mark_coalesced(now, &record.key);
        record.seq = folded.seq;
        record.partition = partition;
        let mut invocation = COALESCE.prepare_invoke();
        invocation
            .key(pk.lease())
            .key(pk.queue())
            .key(pk.done())
            .key(pk.record(&folded.key))
            .key(pk.record(&record.key))
            .key(pk.queued_bytes())
            .arg(&folded.key)
            .arg(folded.seq)
            .arg(&blob)
            .arg(encode(&old)?)
            .arg(now)
            .arg(&record.key)
            .arg(encode(&record)?)
            .arg(tail_seq)
            .arg(record.request.body.len() as i64 - folded.request.body.len() as i64);
        // On a cluster with replicas required, the script carries its own `WAIT`.
        let answer: Value = self.invoke_confirmed(&mut conn, &invocation).await?;
        match answer {
            Value::Int(1) => {
                self.confirm_replicas(&mut conn).await?;
                Ok(Coalesced::Folded { seq: folded.seq })
            }
            Value::Int(0) => Ok(Coalesced::Stale),
            Value::BulkString(existing) => Ok(Coalesced::Existing(Box::new(decode(&existing)?))),
            other => Err(unexpected("coalesce", &other)),
        }
    }

    pub(super) async fn peek_tail_inner(
        &self,
        partition: &str,
        limit: usize,
    ) -> Result<Vec<MutationRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let pk = self.keys.partition(partition);
        let keys: Vec<String> = redis::cmd("ZRANGE")
            .arg(pk.queue())
            .arg(0)
            .arg(limit as i64 - 1)
            .arg("REV")
            .query_async(&mut conn)
            .await?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let record_keys: Vec<String> = keys.iter().map(|k| pk.record(k)).collect();
        let blobs: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&record_keys)
            .query_async(&mut conn)
            .await?;
        blobs.into_iter().flatten().map(|b| decode(&b)).collect()
    }
}
