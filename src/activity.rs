//! What the write path and the replayer share while running: a wake-up when a mutation is
//! queued, which keys are being sent right now (reported `in_flight`, which the store does
//! not record), and the writes still settling after a `write_timeout` 202.
//!
//! A forward on a route with `write_timeout` is registered here when it starts and removed
//! once it has settled (its answer recorded under its key, or the mutation queued). If the app
//! got its `202` before that, the entry is *acknowledged*: until it settles, the mutation is
//! pending for the app (overlaid on its reads, listed by `GET /_outpost/mutations`, reported
//! `in_flight` by its status document). The store holds a copy queued before that `202`
//! (see `outbox::AWAITING_FORWARD`); this registry is what tells the local replayer that the
//! forward is still under way, so the copy waits for its answer.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::store::MutationRecord;

/// Replay activity, shared by the outbox, the replayer, the status documents and the admin API.
#[derive(Default)]
pub struct Activity {
    queued: Notify,
    in_flight: Mutex<HashSet<String>>,
    settling: Mutex<HashMap<String, Settling>>,
}

/// A forward that may outlive its route's `write_timeout`.
struct Settling {
    record: MutationRecord,
    /// The app got a `202` for it.
    acknowledged: bool,
}

impl Activity {
    /// A mutation was queued (or released by an operator): wake the replayer.
    pub fn wake(&self) {
        self.queued.notify_one();
    }

    /// Wait for [`Self::wake`].
    pub async fn woken(&self) {
        self.queued.notified().await;
    }

    /// Whether `key` is being sent right now (by the replayer, or as a forward still settling
    /// after its `202`).
    pub fn is_in_flight(&self, key: &str) -> bool {
        self.in_flight
            .lock()
            .map(|s| s.contains(key))
            .unwrap_or(false)
            || self.settling_record(key).is_some()
    }

    /// Note that `key` is being sent (`on`) or no longer is.
    pub fn set_in_flight(&self, key: &str, on: bool) {
        if let Ok(mut set) = self.in_flight.lock() {
            if on {
                set.insert(key.to_string());
            } else {
                set.remove(key);
            }
        }
    }

    /// A forward of `record` starts that may outlive the route's `write_timeout`.
    pub fn forwarding(&self, record: &MutationRecord) {
        if let Ok(mut map) = self.settling.lock() {
            map.insert(
                record.key.clone(),
                Settling {
                    record: record.clone(),
                    acknowledged: false,
                },
            );
        }
    }

    /// The route's `write_timeout` passed: whether the app may be answered `202` for `key`
    /// (the forward is then pending until it settles). `false` when the forward has just
    /// claimed its answer ([`Self::claim`]): the app gets that answer instead.
    pub fn acknowledge(&self, key: &str) -> bool {
        let Ok(mut map) = self.settling.lock() else {
            return false;
        };
        match map.get_mut(key) {
            Some(entry) => {
                entry.acknowledged = true;
                true
            }
            None => false,
        }
    }

    /// The forward of `key` has its outcome (an answer, or none): whether the app was already
    /// answered `202` (then the outcome must be kept or queued under the key, as nobody waits
    /// for it). Otherwise the entry goes, and the app waiting gets the outcome.
    pub fn claim(&self, key: &str) -> bool {
        let Ok(mut map) = self.settling.lock() else {
            return false;
        };
        if map.get(key).is_some_and(|s| s.acknowledged) {
            return true;
        }
        map.remove(key);
        false
    }

    /// The forward of `key` has settled: the store holds its answer, or the queued mutation.
    pub fn settled(&self, key: &str) {
        if let Ok(mut map) = self.settling.lock() {
            map.remove(key);
        }
    }

    /// The acknowledged forwards still settling, oldest first.
    pub fn settling(&self) -> Vec<MutationRecord> {
        let mut records: Vec<MutationRecord> = self
            .settling
            .lock()
            .map(|map| {
                map.values()
                    .filter(|s| s.acknowledged)
                    .map(|s| s.record.clone())
                    .collect()
            })
            .unwrap_or_default();
        records.sort_by_key(|r| r.accepted_at_ms);
        records
    }

    /// Whether a forward of `key` that may outlive its route's `write_timeout` is under way in
    /// this process, acknowledged with a `202` or not yet.
    pub fn is_forwarding(&self, key: &str) -> bool {
        self.settling
            .lock()
            .map(|map| map.contains_key(key))
            .unwrap_or(false)
    }

    /// The acknowledged forward of `key`, if it is still settling.
    pub fn settling_record(&self, key: &str) -> Option<MutationRecord> {
        let map = self.settling.lock().ok()?;
        map.get(key)
            .filter(|s| s.acknowledged)
            .map(|s| s.record.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MutationStatus, StoredRequest};

    fn record(key: &str, at: u64) -> MutationRecord {
        MutationRecord {
            key: key.into(),
            fingerprint: [0; 32],
            partition: "upstream".into(),
            seq: 0,
            accepted_at_ms: at,
            status: MutationStatus::Queued,
            attempts: 0,
            next_attempt_at_ms: 0,
            principal: None,
            route: "r".into(),
            request: StoredRequest {
                method: "POST".into(),
                path_and_query: "/a".into(),
                headers: Vec::new(),
                body: bytes::Bytes::new(),
            },
            outcome: None,
            response: None,
            finished_at_ms: None,
            identity: None,
        }
    }

    #[test]
    fn only_acknowledged_forwards_are_pending_until_they_settle() {
        let a = Activity::default();
        a.forwarding(&record("fast", 1));
        assert!(
            a.settling().is_empty(),
            "no 202 yet: the app waits for the answer"
        );
        assert!(
            !a.claim("fast"),
            "answered in time: the app gets the answer"
        );
        assert!(
            !a.acknowledge("fast"),
            "no 202 after the answer was claimed"
        );
        assert!(a.settling().is_empty());
        a.forwarding(&record("slow-2", 3));
        a.forwarding(&record("slow-1", 2));
        assert!(a.acknowledge("slow-2"));
        assert!(a.acknowledge("slow-1"));
        assert!(
            a.claim("slow-1"),
            "the app holds a 202: keep or queue the outcome"
        );
        let keys: Vec<String> = a.settling().into_iter().map(|r| r.key).collect();
        assert_eq!(keys, ["slow-1", "slow-2"]);
        assert!(a.is_in_flight("slow-1"));
        a.settled("slow-1");
        assert!(!a.is_in_flight("slow-1"));
        assert!(a.settling_record("slow-2").is_some());
    }
}
