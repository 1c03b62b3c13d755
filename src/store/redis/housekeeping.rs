//! The partition registry (`P:partitions`) and the retention sweep.
//!
//! **Housekeeping.** `purge_finished` deletes finished records older than retention (index
//! first, then record) and forgets partitions that have been empty (no pending, dead or
//! finished items) and unregistered for ten minutes. Every enqueue registers its partition
//! (scored with Redis's clock) *before* writing, and removal is a compare-on-score script, so a
//! partition being written to is not forgotten (only an enqueue stalled ten minutes between
//! registering and writing could be; its call gave up long before).

use std::time::Duration;

use super::primary::Conn;
use redis::{ErrorKind, Value};

use super::Shared;
use super::answers::scored;
use super::scripts::{DELETE_IF, FORGET, PURGE, REGISTER};
use crate::store::{StoreError, now_ms};

/// How long an empty partition stays registered after its last registration.
const PARTITION_IDLE: Duration = Duration::from_secs(600);
/// Finished records purged per script call.
const PURGE_BATCH: usize = 256;

impl Shared {
    /// Note `partition` in the registry (before anything is written to it).
    pub(super) async fn register(
        &self,
        conn: &mut Conn,
        partition: &str,
    ) -> Result<(), StoreError> {
        // Confirmed by replicas on a cluster: replay finds partitions through the registry.
        let _: i64 = self
            .invoke_confirmed(conn, REGISTER.key(self.keys.partitions()).arg(partition))
            .await?;
        Ok(())
    }

    /// Every registered partition and its registration time.
    pub(super) async fn registry(&self, conn: &mut Conn) -> Result<Vec<(String, f64)>, StoreError> {
        let v: Value = redis::cmd("ZRANGE")
            .arg(self.keys.partitions())
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(conn)
            .await?;
        scored(v)
    }

    pub(super) async fn purge_finished_inner(&self, before_ms: u64) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let registry = self.registry(&mut conn).await?;
        let mut purged = 0;
        for (partition, registered) in registry {
            let pk = self.keys.partition(&partition);
            loop {
                let keys: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                    .arg(pk.done())
                    .arg("-inf")
                    .arg(format!("({before_ms}"))
                    .arg("LIMIT")
                    .arg(0)
                    .arg(PURGE_BATCH)
                    .query_async(&mut conn)
                    .await?;
                if keys.is_empty() {
                    break;
                }
                // Index first: a record without index is invisible; an index without record is
                // harmless (module docs).
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.invoke_script(DELETE_IF.key(self.keys.index(key)).arg(&partition));
                }
                let _: Vec<Value> = match pipe.query_async(&mut conn).await {
                    Ok(v) => v,
                    Err(e) if e.kind() == ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                        DELETE_IF.load_async(&mut conn).await?;
                        pipe.query_async(&mut conn).await?
                    }
                    Err(e) => return Err(e.into()),
                };
                let mut purge = PURGE.key(pk.done());
                purge.arg(before_ms);
                for key in &keys {
                    purge.key(pk.record(key)).arg(key);
                }
                let n: u64 = purge.invoke_async(&mut conn).await?;
                purged += n;
                if keys.len() < PURGE_BATCH {
                    break;
                }
            }
            self.forget_if_idle(&mut conn, &partition, registered)
                .await?;
        }
        Ok(purged)
    }

    /// Drop an empty partition from the registry once it has been idle for [`PARTITION_IDLE`].
    async fn forget_if_idle(
        &self,
        conn: &mut Conn,
        partition: &str,
        registered: f64,
    ) -> Result<(), StoreError> {
        let idle_ms = PARTITION_IDLE.as_millis() as u64;
        // Cheap pre-filter on our clock; the script decides on Redis's.
        if registered > now_ms().saturating_sub(idle_ms) as f64 {
            return Ok(());
        }
        let pk = self.keys.partition(partition);
        let (q, dead, done): (u64, u64, u64) = redis::pipe()
            .cmd("ZCARD")
            .arg(pk.queue())
            .cmd("ZCARD")
            .arg(pk.dead())
            .cmd("ZCARD")
            .arg(pk.done())
            .query_async(conn)
            .await?;
        if q + dead + done > 0 {
            return Ok(());
        }
        let _: i64 = FORGET
            .key(self.keys.partitions())
            .arg(partition)
            .arg(registered)
            .arg(idle_ms)
            .invoke_async(conn)
            .await?;
        Ok(())
    }
}
