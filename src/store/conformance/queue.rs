//! The [`Queue`](crate::store::Queue) role: idempotent enqueue, strictly increasing sequence
//! numbers, FIFO per partition, finish and dead-letter bookkeeping, the operator's retry, edit
//! and drop, depths per partition, and retention. The replayer's writes need a lease, so these
//! checks take a whole [`Store`]; they hold at most one lease per partition at a time, as one
//! instance does.

use bytes::Bytes;

use crate::store::{Coalesced, Enqueued, MutationRecord, MutationStatus, Store, now_ms};

use super::record;

/// Every queue check, in turn, against one store (they use distinct keys and partitions).
pub async fn run(store: &dyn Store) {
    enqueue_is_idempotent_and_ordered(store).await;
    partitions_are_independent_fifos(store).await;
    finish_and_dead_letters(store).await;
    operator_retry_and_drop(store).await;
    dead_letter_edits(store).await;
    coalescing(store).await;
    queued_totals_follow_the_queue(store).await;
}

/// `queued_totals` counts pending items and their body bytes, through enqueue, finish, dead
/// letters, the operator's retry and drop (relative to what earlier checks left behind).
async fn queued_totals_follow_the_queue(store: &dyn Store) {
    let before = store.queued_totals().await.unwrap();
    for key in ["t1", "t2", "t3"] {
        store.enqueue(record(key, "pt")).await.unwrap();
    }
    // A key again adds nothing.
    store.enqueue(record("t1", "pt")).await.unwrap();
    let body = record("t1", "pt").request.body.len() as u64;
    let totals = store.queued_totals().await.unwrap();
    assert_eq!(totals.depth, before.depth + 3);
    assert_eq!(totals.bytes, before.bytes + 3 * body);
    let lease = store.acquire("pt").await.unwrap().expect("lease");
    let mut head = store.peek("pt", 2).await.unwrap();
    let mut rejected = head.remove(1);
    let mut done = head.remove(0);
    done.status = MutationStatus::Succeeded;
    done.finished_at_ms = Some(now_ms());
    store.finish(&lease, &done).await.unwrap();
    rejected.status = MutationStatus::Rejected;
    rejected.finished_at_ms = Some(now_ms());
    store.finish(&lease, &rejected).await.unwrap();
    store.release(&lease).await.unwrap();
    let totals = store.queued_totals().await.unwrap();
    assert_eq!(
        totals.depth,
        before.depth + 1,
        "finished and dead letters leave"
    );
    assert_eq!(totals.bytes, before.bytes + body);
    assert!(store.retry_dead_letter(&rejected.key).await.unwrap());
    let totals = store.queued_totals().await.unwrap();
    assert_eq!(
        totals.depth,
        before.depth + 2,
        "a retried dead letter is back"
    );
    assert_eq!(totals.bytes, before.bytes + 2 * body);
    assert!(store.drop_mutation("t3").await.unwrap());
    assert!(store.drop_mutation(&rejected.key).await.unwrap());
    assert_eq!(store.queued_totals().await.unwrap(), before);
}

async fn enqueue_is_idempotent_and_ordered(store: &dyn Store) {
    let a = store.enqueue(record("a1", "pa")).await.unwrap();
    let Enqueued::Accepted { seq: s1 } = a else {
        panic!("first enqueue accepted: {a:?}")
    };
    let b = store.enqueue(record("a2", "pa")).await.unwrap();
    let Enqueued::Accepted { seq: s2 } = b else {
        panic!("second enqueue accepted: {b:?}")
    };
    assert!(s2 > s1, "sequence numbers increase: {s1} then {s2}");
    let mut again = record("a1", "pa");
    again.request.body = Bytes::from_static(b"other");
    match store.enqueue(again).await.unwrap() {
        Enqueued::Existing(existing) => {
            assert_eq!(existing.seq, s1);
            assert_eq!(existing.request.body, Bytes::from("body of a1"));
        }
        other => panic!("re-enqueue must return the existing record, got {other:?}"),
    }
    let got = store.mutation("a1").await.unwrap().expect("stored");
    assert_eq!(got.status, MutationStatus::Queued);
    assert!(store.mutation("nope").await.unwrap().is_none());
    assert!(store.partition_has_pending("pa").await.unwrap());
    let head = store.peek("pa", 10).await.unwrap();
    assert_eq!(
        head.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        ["a1", "a2"]
    );
    let lease = store.acquire("pa").await.unwrap().expect("lease");
    for mut r in head {
        r.status = MutationStatus::Succeeded;
        r.finished_at_ms = Some(now_ms());
        store.finish(&lease, &r).await.unwrap();
    }
    store.release(&lease).await.unwrap();
    assert!(!store.partition_has_pending("pa").await.unwrap());
    let done = store
        .mutation("a1")
        .await
        .unwrap()
        .expect("kept after finish");
    assert_eq!(done.status, MutationStatus::Succeeded);
}

async fn partitions_are_independent_fifos(store: &dyn Store) {
    for i in 0..5 {
        store.enqueue(record(&format!("x{i}"), "px")).await.unwrap();
        store.enqueue(record(&format!("y{i}"), "py")).await.unwrap();
    }
    let mut parts = store.pending_partitions().await.unwrap();
    parts.sort();
    assert_eq!(parts, ["px", "py"]);
    let mut depths = store.partition_depths().await.unwrap();
    depths.sort();
    assert_eq!(depths, [("px".to_string(), 5), ("py".to_string(), 5)]);
    let x = store.peek("px", 3).await.unwrap();
    assert_eq!(
        x.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        ["x0", "x1", "x2"]
    );
    // Reading on past an item: only those with a higher sequence number, in order.
    let after = store.peek_after("px", x[1].seq, 2).await.unwrap();
    assert_eq!(
        after.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        ["x2", "x3"]
    );
    let rest = store.peek_after("px", x[0].seq, 100).await.unwrap();
    assert_eq!(rest.len(), 4, "all after the first");
    assert_eq!(store.peek_after("px", 0, 100).await.unwrap().len(), 5);
    assert!(
        store
            .peek_after("px", u64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.peek_after("nowhere", 0, 10).await.unwrap().is_empty());
    // An update keeps the item pending and in place.
    let lease = store.acquire("px").await.unwrap().expect("lease");
    let mut first = x[0].clone();
    first.attempts = 3;
    first.next_attempt_at_ms = 42;
    store.update(&lease, &first).await.unwrap();
    let x = store.peek("px", 1).await.unwrap();
    assert_eq!((x[0].key.as_str(), x[0].attempts), ("x0", 3));
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.queue_depth, 10);
    assert!(stats.oldest_pending_ms.is_some());
    for p in ["px", "py"] {
        let lease = store.acquire(p).await.unwrap().expect("lease");
        for mut r in store.peek(p, 100).await.unwrap() {
            r.status = MutationStatus::Succeeded;
            store.finish(&lease, &r).await.unwrap();
        }
        store.release(&lease).await.unwrap();
    }
    assert_eq!(store.stats().await.unwrap().queue_depth, 0);
    assert!(
        store.partition_depths().await.unwrap().is_empty(),
        "partitions without pending items are left out"
    );
}

async fn finish_and_dead_letters(store: &dyn Store) {
    store.enqueue(record("d1", "pd")).await.unwrap();
    store.enqueue(record("d2", "pd")).await.unwrap();
    let lease = store.acquire("pd").await.unwrap().expect("lease");
    let mut head = store.peek("pd", 1).await.unwrap().remove(0);
    head.status = MutationStatus::Conflict;
    head.finished_at_ms = Some(now_ms());
    store.finish(&lease, &head).await.unwrap();
    // The partition goes on past a dead letter.
    let next = store.peek("pd", 1).await.unwrap();
    assert_eq!(next[0].key, "d2");
    let dead = store.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].key, "d1");
    assert!(
        !dead[0].request.body.is_empty(),
        "dead letters keep the body"
    );
    assert_eq!(store.stats().await.unwrap().dead_letters, 1);
    // Retry puts it back at the tail.
    assert!(store.retry_dead_letter("d1").await.unwrap());
    assert!(!store.retry_dead_letter("d1").await.unwrap(), "only once");
    let order = store.peek("pd", 10).await.unwrap();
    assert_eq!(
        order.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        ["d2", "d1"]
    );
    assert_eq!(store.stats().await.unwrap().dead_letters, 0);
    for mut r in order {
        r.status = MutationStatus::Succeeded;
        r.finished_at_ms = Some(1);
        store.finish(&lease, &r).await.unwrap();
    }
    store.release(&lease).await.unwrap();
    // Finished records are purged after retention; the forwarded record too.
    let mut fwd = record("f1", "pf");
    fwd.status = MutationStatus::Succeeded;
    fwd.finished_at_ms = Some(1);
    store.record_forwarded(fwd).await.unwrap();
    assert!(store.mutation("f1").await.unwrap().is_some());
    let purged = store.purge_finished(2).await.unwrap();
    assert!(purged >= 3, "purged {purged}");
    assert!(store.mutation("f1").await.unwrap().is_none());
    assert!(store.mutation("d1").await.unwrap().is_none());
}

async fn operator_retry_and_drop(store: &dyn Store) {
    let keys = |records: &[MutationRecord]| {
        records
            .iter()
            .map(|r| r.key.clone())
            .collect::<Vec<String>>()
    };
    let before = store.stats().await.unwrap();
    store.enqueue(record("o1", "po")).await.unwrap();
    store.enqueue(record("o2", "po")).await.unwrap();
    let lease = store.acquire("po").await.unwrap().expect("lease");
    // The first one waits for fresh credentials, with a backoff far in the future.
    let mut first = store.peek("po", 1).await.unwrap().remove(0);
    assert_eq!(first.key, "o1");
    first.status = MutationStatus::AuthRequired;
    first.attempts = 1;
    first.next_attempt_at_ms = now_ms() + 3_600_000;
    store.update(&lease, &first).await.unwrap();
    let held = store.peek("po", 1).await.unwrap().remove(0);
    assert_eq!(held.status, MutationStatus::AuthRequired);

    // "Try it now": queued, no backoff, same place, same request (and credentials).
    assert!(store.retry_pending("o1").await.unwrap());
    let order = store.peek("po", 10).await.unwrap();
    assert_eq!(keys(&order), ["o1", "o2"], "retry keeps the item's place");
    assert_eq!(order[0].status, MutationStatus::Queued);
    assert_eq!(order[0].next_attempt_at_ms, 0);
    assert_eq!(order[0].seq, first.seq);
    assert_eq!(order[0].request, first.request);
    assert!(!store.retry_pending("unknown-key").await.unwrap());

    // Drop a pending item: it leaves its partition, and its key still answers.
    let dropped_after = now_ms();
    assert!(store.drop_mutation("o1").await.unwrap());
    let order = store.peek("po", 10).await.unwrap();
    assert_eq!(keys(&order), ["o2"]);
    let o1 = store
        .mutation("o1")
        .await
        .unwrap()
        .expect("kept after drop");
    assert_eq!(o1.status, MutationStatus::Rejected);
    assert_eq!(o1.outcome.as_deref(), Some("dropped by operator"));
    assert!(o1.request.body.is_empty(), "finished records keep no body");
    assert!(o1.finished_at_ms.is_some(), "kept as a finished record");
    assert!(
        !store.retry_pending("o1").await.unwrap(),
        "no longer pending"
    );
    assert!(!store.drop_mutation("o1").await.unwrap(), "dropped once");
    // A replay that was in flight while the operator dropped it must not bring it back.
    let mut late = first.clone();
    late.status = MutationStatus::Queued;
    late.attempts = 2;
    late.next_attempt_at_ms = now_ms() + 1000;
    assert!(
        matches!(
            store.update(&lease, &late).await,
            Err(crate::store::StoreError::NotQueued { .. })
        ),
        "an update of a dropped item is refused"
    );
    let o1_again = store.mutation("o1").await.unwrap().expect("kept");
    assert_eq!(o1_again.status, MutationStatus::Rejected, "still dropped");
    assert_eq!(keys(&store.peek("po", 10).await.unwrap()), ["o2"]);
    // Finishing it (an answer recorded late, or again after an error) changes nothing either.
    let mut finished_late = late.clone();
    finished_late.status = MutationStatus::Succeeded;
    finished_late.finished_at_ms = Some(now_ms());
    store.finish(&lease, &finished_late).await.unwrap();
    let o1_again = store.mutation("o1").await.unwrap().expect("kept");
    assert_eq!(o1_again.outcome.as_deref(), Some("dropped by operator"));
    assert!(
        !store.retry_dead_letter("o1").await.unwrap(),
        "a dropped item is not a dead letter"
    );
    assert!(
        store
            .dead_letters(100)
            .await
            .unwrap()
            .iter()
            .all(|r| r.key != "o1")
    );
    assert_eq!(
        store.stats().await.unwrap().queue_depth,
        before.queue_depth + 1
    );

    // Drop a dead letter: it leaves the dead-letter list.
    let mut second = order[0].clone();
    second.status = MutationStatus::Conflict;
    second.finished_at_ms = Some(now_ms());
    store.finish(&lease, &second).await.unwrap();
    assert!(!store.partition_has_pending("po").await.unwrap());
    assert!(
        !store.retry_pending("o2").await.unwrap(),
        "a dead letter is not pending"
    );
    assert!(
        keys(&store.dead_letters(100).await.unwrap()).contains(&"o2".to_string()),
        "dead-lettered"
    );
    assert_eq!(
        store.stats().await.unwrap().dead_letters,
        before.dead_letters + 1
    );
    assert!(store.drop_mutation("o2").await.unwrap());
    assert!(
        !keys(&store.dead_letters(100).await.unwrap()).contains(&"o2".to_string()),
        "no longer a dead letter"
    );
    assert_eq!(
        store.stats().await.unwrap().dead_letters,
        before.dead_letters
    );
    assert!(!store.retry_dead_letter("o2").await.unwrap());
    let o2 = store
        .mutation("o2")
        .await
        .unwrap()
        .expect("kept after drop");
    assert_eq!(o2.status, MutationStatus::Rejected);
    assert_eq!(o2.outcome.as_deref(), Some("dropped by operator"));
    assert!(o2.request.body.is_empty(), "finished records keep no body");

    // A finished (succeeded) item is neither pending nor a dead letter.
    store.enqueue(record("o3", "po")).await.unwrap();
    let mut third = store.peek("po", 1).await.unwrap().remove(0);
    third.status = MutationStatus::Succeeded;
    third.finished_at_ms = Some(now_ms());
    store.finish(&lease, &third).await.unwrap();
    assert!(!store.drop_mutation("o3").await.unwrap());
    assert!(!store.retry_pending("o3").await.unwrap());
    let o3 = store.mutation("o3").await.unwrap().expect("kept");
    assert_eq!(o3.status, MutationStatus::Succeeded);
    store.release(&lease).await.unwrap();

    // Dropped records are kept for the retention period, then purged like finished ones.
    store.purge_finished(dropped_after).await.unwrap();
    assert!(store.mutation("o1").await.unwrap().is_some());
    assert!(store.mutation("o2").await.unwrap().is_some());
    store.purge_finished(now_ms() + 60_000).await.unwrap();
    assert!(store.mutation("o1").await.unwrap().is_none());
    assert!(store.mutation("o2").await.unwrap().is_none());
    let after = store.stats().await.unwrap();
    assert_eq!(
        (after.queue_depth, after.dead_letters),
        (before.queue_depth, before.dead_letters)
    );
}

async fn dead_letter_edits(store: &dyn Store) {
    use crate::store::{DeadLetterEdit, SUPERSEDED_PREFIX};
    for key in ["e1", "e2"] {
        store.enqueue(record(key, "pe")).await.unwrap();
    }
    let lease = store.acquire("pe").await.unwrap().expect("lease");
    for mut r in store.peek("pe", 10).await.unwrap() {
        r.status = MutationStatus::Rejected;
        r.finished_at_ms = Some(now_ms());
        store.finish(&lease, &r).await.unwrap();
    }
    store.release(&lease).await.unwrap();
    // Same body, edited headers: back on the queue under its key, with the new headers.
    let headers = vec![("x-fixed".to_string(), Bytes::from_static(b"yes"))];
    let edit = DeadLetterEdit::Headers(headers.clone());
    assert!(store.edit_dead_letter("e1", edit.clone()).await.unwrap());
    assert!(
        !store.edit_dead_letter("e1", edit).await.unwrap(),
        "no longer a dead letter"
    );
    let queued = store.peek("pe", 10).await.unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].key, "e1");
    assert_eq!(queued[0].request.headers, headers);
    assert_eq!(queued[0].request.body, record("e1", "pe").request.body);
    // Edited body: the dead letter points to the new key and keeps no body.
    let superseded = DeadLetterEdit::Superseded("e2.edit-1".into());
    assert!(
        !store
            .edit_dead_letter("e1", superseded.clone())
            .await
            .unwrap(),
        "pending"
    );
    assert!(store.edit_dead_letter("e2", superseded).await.unwrap());
    let old = store.mutation("e2").await.unwrap().expect("kept");
    assert_eq!(old.status, MutationStatus::Rejected);
    assert_eq!(old.outcome, Some(format!("{SUPERSEDED_PREFIX}e2.edit-1")));
    assert!(old.request.body.is_empty());
    assert!(
        store
            .dead_letters(10)
            .await
            .unwrap()
            .iter()
            .all(|r| r.key != "e2")
    );
    let lease = store.acquire("pe").await.unwrap().expect("lease");
    let mut e1 = store.peek("pe", 1).await.unwrap().remove(0);
    e1.status = MutationStatus::Succeeded;
    e1.finished_at_ms = Some(now_ms());
    store.finish(&lease, &e1).await.unwrap();
    store.release(&lease).await.unwrap();
}

/// `enqueue_coalesced`: the new record takes the folded one's place (its sequence number), the
/// folded one is finished as `coalesced` into it; nothing changes when the folded record, the
/// queue's tail or the partition's lease says the caller's view is stale.
async fn coalescing(store: &dyn Store) {
    let p = "pcoal";
    store.enqueue(record("c1", p)).await.unwrap();
    store.enqueue(record("c2", p)).await.unwrap();
    let tail = store.peek_tail(p, 10).await.unwrap();
    assert_eq!(
        tail.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        ["c2", "c1"],
        "newest first"
    );
    assert_eq!(store.peek_tail(p, 1).await.unwrap().len(), 1, "bounded");
    let (c2, c1) = (tail[0].clone(), tail[1].clone());

    let mut c3 = record("c3", p);
    c3.request.body = Bytes::from_static(b"merged");
    let totals = store.queued_totals().await.unwrap();
    let done = store
        .enqueue_coalesced(c3.clone(), &c1, c2.seq)
        .await
        .unwrap();
    assert_eq!(done, Coalesced::Folded { seq: c1.seq });
    let after = store.queued_totals().await.unwrap();
    assert_eq!(after.depth, totals.depth, "a fold keeps the depth");
    assert_eq!(
        after.bytes + c1.request.body.len() as u64,
        totals.bytes + c3.request.body.len() as u64,
        "the queued bytes follow the new body"
    );
    let queue = store.peek(p, 10).await.unwrap();
    assert_eq!(
        queue.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        ["c3", "c2"],
        "the new key in the folded one's place"
    );
    assert_eq!(queue[0].seq, c1.seq);
    assert_eq!(queue[0].request.body, Bytes::from_static(b"merged"));
    let folded = store.mutation("c1").await.unwrap().expect("kept");
    assert_eq!(folded.status, MutationStatus::Coalesced);
    assert_eq!(folded.coalesced_into(), Some("c3"));
    assert!(folded.request.body.is_empty(), "no body kept");
    let depth = store.partition_depths().await.unwrap();
    assert!(depth.contains(&(p.to_string(), 2)), "{depth:?}");
    assert_eq!(
        store.enqueue(record("c1", p)).await.unwrap(),
        Enqueued::Existing(Box::new(folded)),
        "the folded key still answers"
    );

    // Stale views change nothing.
    let c3 = queue[0].clone();
    let stale_tail = store
        .enqueue_coalesced(record("c4", p), &c3, c3.seq)
        .await
        .unwrap();
    assert_eq!(stale_tail, Coalesced::Stale, "the tail is c2, not c3");
    let mut changed = c3.clone();
    changed.attempts = 5;
    let stale_record = store
        .enqueue_coalesced(record("c4", p), &changed, c2.seq)
        .await
        .unwrap();
    assert_eq!(stale_record, Coalesced::Stale, "not the record read");
    let lease = store.acquire(p).await.unwrap().expect("lease");
    let leased = store
        .enqueue_coalesced(record("c4", p), &c3, c2.seq)
        .await
        .unwrap();
    assert_eq!(leased, Coalesced::Stale, "a replayer holds the partition");
    assert!(store.mutation("c4").await.unwrap().is_none());
    let existing = store
        .enqueue_coalesced(record("c2", p), &c3, c2.seq)
        .await
        .unwrap();
    assert!(
        matches!(existing, Coalesced::Existing(ref r) if r.key == "c2"),
        "{existing:?}"
    );
    assert_eq!(store.peek(p, 10).await.unwrap().len(), 2, "unchanged");

    // The new key is replayed and finished as usual; the folded one stays coalesced.
    for mut r in store.peek(p, 10).await.unwrap() {
        r.status = MutationStatus::Succeeded;
        r.finished_at_ms = Some(now_ms());
        store.finish(&lease, &r).await.unwrap();
    }
    store.release(&lease).await.unwrap();
    assert!(!store.partition_has_pending(p).await.unwrap());
    let folded = store.mutation("c1").await.unwrap().expect("kept");
    assert_eq!(folded.status, MutationStatus::Coalesced);
    // With the lease released, folding works again.
    store.enqueue(record("c5", p)).await.unwrap();
    let tail = store.peek_tail(p, 10).await.unwrap();
    let again = store
        .enqueue_coalesced(record("c6", p), &tail[0], tail[0].seq)
        .await
        .unwrap();
    assert_eq!(again, Coalesced::Folded { seq: tail[0].seq });
}
