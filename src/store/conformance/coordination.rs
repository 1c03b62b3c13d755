//! The [`Coordination`] role. [`run`] holds for every backend, one instance on its own: leases
//! are granted, renewed, superseded and released, and credentials shared at a time are not
//! "fresh" for a mutation that started waiting then or later. [`shared_between`] holds for
//! backends that several instances share (Redis, the in-memory store's instances): a lease is
//! exclusive and fenced, a stale lease's writes are refused, and credentials and waiting
//! announcements reach the other instance. (The embedded store, opened by one process only,
//! grants every lease and shares nothing; its own docs say why.)

use std::time::Duration;

use bytes::Bytes;

use crate::store::{Coordination, MutationStatus, Store, StoreError, now_ms};

use super::record;

/// Every single-instance coordination check against one store.
pub async fn run(store: &dyn Coordination) {
    leases_are_granted_renewed_and_released(store).await;
    credentials_are_fresh_only_after_the_wait_began(store).await;
}

/// Every check of a shared store, with `a` and `b` two instances of one fresh store.
pub async fn shared_between(a: &dyn Store, b: &dyn Store) {
    leases_are_exclusive_and_stale_ones_are_refused(a, b).await;
    credentials_and_waiting_reach_the_other_instance(a, b).await;
}

fn credentials(token: &str) -> Vec<(String, Bytes)> {
    vec![(
        "authorization".to_string(),
        Bytes::from(format!("Bearer {token}")),
    )]
}

async fn leases_are_granted_renewed_and_released(store: &dyn Coordination) {
    let lease = store
        .acquire("pc")
        .await
        .unwrap()
        .expect("a free partition");
    assert_eq!(lease.partition, "pc");
    assert!(store.renew(&lease).await.unwrap(), "renewed while held");
    // The replayer may acquire a partition it holds again (a restarted drain).
    let newer = store
        .acquire("pc")
        .await
        .unwrap()
        .expect("its own partition again");
    assert!(store.renew(&newer).await.unwrap(), "the newer lease holds");
    store.release(&newer).await.unwrap();
    let after = store
        .acquire("pc")
        .await
        .unwrap()
        .expect("free again after the release");
    store.release(&after).await.unwrap();
}

async fn credentials_are_fresh_only_after_the_wait_began(store: &dyn Coordination) {
    store
        .share_credentials("alice", &credentials("alice-1"), 1_000)
        .await
        .unwrap();
    assert!(
        store
            .shared_credentials("alice", 1_000)
            .await
            .unwrap()
            .is_none(),
        "offered when the wait began: not fresh"
    );
    assert!(
        store
            .shared_credentials("nobody", 0)
            .await
            .unwrap()
            .is_none()
    );
    store
        .announce_waiting(Duration::from_secs(5))
        .await
        .unwrap();
    // Whether this instance sees its own announcement depends on the backend; it answers.
    store.anyone_waiting().await.unwrap();
}

async fn leases_are_exclusive_and_stale_ones_are_refused(a: &dyn Store, b: &dyn Store) {
    a.enqueue(record("s1", "ps")).await.unwrap();
    let stale = a.acquire("ps").await.unwrap().expect("a takes it");
    assert!(
        b.acquire("ps").await.unwrap().is_none(),
        "b waits while a holds it"
    );
    assert!(a.renew(&stale).await.unwrap());
    a.release(&stale).await.unwrap();
    let lease = b.acquire("ps").await.unwrap().expect("b takes it");
    assert!(lease.token > stale.token, "fencing tokens increase");
    assert!(!a.renew(&stale).await.unwrap(), "a's lease is gone");
    assert!(a.acquire("ps").await.unwrap().is_none(), "b holds it now");

    // a's writes under its stale lease are refused and change nothing.
    let mut item = b.peek("ps", 1).await.unwrap().remove(0);
    item.attempts = 5;
    assert!(matches!(
        a.update(&stale, &item).await,
        Err(StoreError::LeaseLost { .. })
    ));
    item.status = MutationStatus::Succeeded;
    item.finished_at_ms = Some(now_ms());
    assert!(matches!(
        a.finish(&stale, &item).await,
        Err(StoreError::LeaseLost { .. })
    ));
    let held = b.peek("ps", 1).await.unwrap();
    assert_eq!((held[0].key.as_str(), held[0].attempts), ("s1", 0));
    // A lease of another partition is no lease for this one.
    let other = b.acquire("ps-other").await.unwrap().expect("free");
    assert!(matches!(
        b.finish(&other, &item).await,
        Err(StoreError::LeaseLost { .. })
    ));
    b.release(&other).await.unwrap();

    b.finish(&lease, &item).await.unwrap();
    assert!(!a.partition_has_pending("ps").await.unwrap());
    b.release(&lease).await.unwrap();
    assert!(
        a.acquire("ps").await.unwrap().is_some(),
        "free after release"
    );
}

async fn credentials_and_waiting_reach_the_other_instance(a: &dyn Store, b: &dyn Store) {
    a.share_credentials("carol", &credentials("carol-2"), 2_000)
        .await
        .unwrap();
    assert_eq!(
        b.shared_credentials("carol", 1_999).await.unwrap(),
        Some(credentials("carol-2"))
    );
    assert_eq!(
        b.shared_credentials("*", 1_999).await.unwrap(),
        Some(credentials("carol-2")),
        "also as the newest of anyone's"
    );
    assert!(
        b.shared_credentials("carol", 2_000)
            .await
            .unwrap()
            .is_none(),
        "not newer than the wait"
    );
    a.announce_waiting(Duration::from_secs(5)).await.unwrap();
    assert!(b.anyone_waiting().await.unwrap());
}
