//! One test suite that every store backend must pass, one module per role: [`queue`],
//! [`cache`] and [`coordination`]. Each backend's tests run [`run_all`] against a fresh store;
//! backends shared by several instances (Redis, and the in-memory store's instances) also run
//! [`coordination::shared_between`] against two instances of one store.
//!
//! It checks the invariants listed in `store.rs`. Built for unit tests and with the
//! `conformance` feature, which this crate's integration tests enable (through its
//! dev-dependency on itself) to run it against a live Redis; never part of a release build.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod cache;
pub mod coordination;
pub mod queue;

use std::sync::Arc;

use bytes::Bytes;

use super::{MutationRecord, MutationStatus, Store, StoredRequest, now_ms};

/// A pending record for tests.
pub fn record(key: &str, partition: &str) -> MutationRecord {
    MutationRecord {
        key: key.to_string(),
        fingerprint: [7; 32],
        partition: partition.to_string(),
        seq: 0,
        accepted_at_ms: now_ms(),
        status: MutationStatus::Queued,
        attempts: 0,
        next_attempt_at_ms: 0,
        principal: None,
        route: "default".into(),
        request: StoredRequest {
            method: "POST".into(),
            path_and_query: format!("/items/{key}"),
            headers: vec![("content-type".into(), Bytes::from_static(b"text/plain"))],
            body: Bytes::from(format!("body of {key}")),
        },
        outcome: None,
        response: None,
        finished_at_ms: None,
        identity: Some([1; 32]),
    }
}

/// Run every conformance check of every role against a fresh, empty store.
pub async fn run_all(store: Arc<dyn Store>) {
    queue::run(&*store).await;
    cache::run(&*store).await;
    coordination::run(&*store).await;
}
