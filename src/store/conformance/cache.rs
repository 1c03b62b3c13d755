//! The [`ResponseStore`] role: a blob put is got back (cache writes may be asynchronous, so the
//! checks poll briefly), a missing key is none, an expired entry is gone, and the counters see
//! what was stored.

use std::time::Duration;

use bytes::Bytes;

use crate::store::ResponseStore;

/// Every cache check against one store.
pub async fn run(store: &dyn ResponseStore) {
    cache_roundtrip(store).await;
    cache_counts_entries_and_bytes(store).await;
}

async fn cache_roundtrip(store: &dyn ResponseStore) {
    let ttl = Duration::from_secs(60);
    store
        .cache_put(b"k1", Bytes::from_static(b"v1"), ttl)
        .await
        .unwrap();
    // Cache writes may be asynchronous; poll briefly.
    let mut got = None;
    for _ in 0..100 {
        got = store.cache_get(b"k1").await.unwrap();
        if got.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got, Some(Bytes::from_static(b"v1")));
    assert!(store.cache_get(b"missing").await.unwrap().is_none());
    store
        .cache_put(b"short", Bytes::from_static(b"x"), Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        store.cache_get(b"short").await.unwrap().is_none(),
        "expired"
    );
}

async fn cache_counts_entries_and_bytes(store: &dyn ResponseStore) {
    let ttl = Duration::from_secs(60);
    store
        .cache_put(b"counted", Bytes::from_static(b"12345"), ttl)
        .await
        .unwrap();
    // Counters may follow asynchronous writes; poll briefly.
    let mut stats = store.cache_stats().await.unwrap();
    for _ in 0..100 {
        if stats.cache_entries >= 2 && stats.cache_bytes >= 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        stats = store.cache_stats().await.unwrap();
    }
    assert!(
        stats.cache_entries >= 2 && stats.cache_bytes >= 7,
        "v1 and counted are stored: {stats:?}"
    );
}
