//! The Lua scripts: every multi-key write of the Redis backend is one of them, over keys of one
//! slot (see [`super::keys`]). Their text is in `lua/*.lua`; what several scripts share is
//! written once, as a prelude put in front of them at build time:
//!
//! - `lease_guard.lua`: the caller must hold the partition's lease (`KEYS[1]`, value
//!   `ARGV[1]`), else the script answers -1 and writes nothing. In front of `UPDATE`, `FINISH`
//!   and `RENEW`.
//! - `lists.lua`: `listed(zset, member, seq)` (the item is on the queue or dead list with that
//!   sequence number) and `overtaken(queue, seq)` (the queue's tail is already at or above it).
//! - `now.lua`: `now`, in milliseconds on Redis's clock.
//!
//! Each constant's doc gives its `KEYS`, `ARGV` and answers.

use std::sync::LazyLock;

use redis::Script;

/// A script made of the given files of `lua/`, in order (preludes first).
macro_rules! script {
    ($($file:literal),+ $(,)?) => {
        LazyLock::new(|| Script::new(concat!($(include_str!(concat!("lua/", $file))),+)))
    };
}

/// `ENQUEUE` KEYS: queue, record 1..n, queued bytes. ARGV: key, seq, blob, body bytes for each
/// record (seqs increasing). Adds the bodies of the records it stores to the queued bytes. Returns 0 when the first seq is not above the queue's tail (renumber all and try again),
/// else one answer per record: its existing blob (nothing changed) or 1 (stored).
pub(super) static ENQUEUE: LazyLock<Script> = script!("lists.lua", "enqueue.lua");

/// `COALESCE` KEYS: lease, queue, done, folded record, new record. ARGV: folded key, folded
/// seq, folded blob read, folded new blob, finished_at, new key, new blob, tail seq seen.
/// Returns the new key's existing blob (nothing changed), 0 (a replayer holds the partition, or
/// the folded item or the queue's tail changed: unchanged) or 1 (the new key took the folded
/// one's place in the queue; the folded one is finished).
pub(super) static COALESCE: LazyLock<Script> = script!("lists.lua", "coalesce.lua");

/// `RECORD_FORWARDED` KEYS: record, done. ARGV: key, finished_at, blob. Returns 1 when stored.
pub(super) static RECORD_FORWARDED: LazyLock<Script> = script!("record_forwarded.lua");

/// `UPDATE` KEYS: lease, record, queue. ARGV: lease value, key, seq, blob.
/// Returns -1 (lease lost), 0 (no longer pending with that seq: unchanged) or 1.
pub(super) static UPDATE: LazyLock<Script> = script!("lease_guard.lua", "lists.lua", "update.lua");

/// `FINISH` KEYS: lease, record, queue, dead-or-done list, queued bytes. ARGV: lease value, key,
/// seq, blob, score, body bytes (taken off the queued bytes).
/// Returns -1 (lease lost), 0 (already finished: unchanged) or 1.
pub(super) static FINISH: LazyLock<Script> = script!("lease_guard.lua", "lists.lua", "finish.lua");

/// `RETRY_DEAD` KEYS: record, queue, dead, queued bytes. ARGV: key, old seq, new seq, blob, body
/// bytes (added to the queued bytes).
/// Returns 1 (queued again), 0 (not a dead letter with that seq) or -2 (seq too low: take another).
pub(super) static RETRY_DEAD: LazyLock<Script> = script!("lists.lua", "retry_dead.lua");

/// `RETRY_PENDING` KEYS: record, queue. ARGV: key, seq, blob read, new blob.
/// Returns 1 (written), 0 (not pending with that seq: unchanged) or -1 (the record is no longer
/// the blob read: read it again).
pub(super) static RETRY_PENDING: LazyLock<Script> = script!("lists.lua", "retry_pending.lua");

/// `DROP` KEYS: record, queue, dead, done, queued bytes. ARGV: key, seq, blob read, new blob,
/// finished_at, `any` or `dead`, body bytes (taken off the queued bytes when it was pending). Takes the key out of the queue or the dead list (whichever holds it with
/// that seq; with `dead`, only the dead list), writes the new blob and lists the key as
/// finished. Returns 1 (dropped), 0 (neither pending nor a
/// dead letter: unchanged) or -1 (the record is no longer the blob read: read it again).
pub(super) static DROP: LazyLock<Script> = script!("lists.lua", "drop.lua");

/// `PURGE` KEYS: done, record 1..n. ARGV: before, key 1..n. Returns how many were deleted.
pub(super) static PURGE: LazyLock<Script> = script!("purge.lua");

/// `ACQUIRE` KEYS: lease. ARGV: new value, our owner prefix, ms.
/// Returns 1 when the lease is free or already ours (the new value supersedes the old), else 0.
pub(super) static ACQUIRE: LazyLock<Script> = script!("acquire.lua");

/// `RENEW` KEYS: lease. ARGV: value, ms. Returns 1 while the lease is ours (else -1).
pub(super) static RENEW: LazyLock<Script> = script!("lease_guard.lua", "renew.lua");

/// `DELETE_IF` KEYS: key. ARGV: expected value. Deletes the key only if it holds that value.
pub(super) static DELETE_IF: LazyLock<Script> = script!("delete_if.lua");

/// `REPLACE_IF` KEYS: key. ARGV: expected value, new value. Returns 1 when replaced.
pub(super) static REPLACE_IF: LazyLock<Script> = script!("replace_if.lua");

/// `RAISE` KEYS: counter. ARGV: floor. Sets the counter to `floor` when it is below; returns 1
/// when it did.
pub(super) static RAISE: LazyLock<Script> = script!("raise.lua");

/// `REGISTER` KEYS: partitions. ARGV: partition. Scores it with the server's time.
pub(super) static REGISTER: LazyLock<Script> = script!("now.lua", "register.lua");

/// `FORGET` KEYS: partitions. ARGV: partition, score seen, idle ms.
/// Removes the partition only if nobody registered it since, and only once it is idle.
pub(super) static FORGET: LazyLock<Script> = script!("now.lua", "forget.lua");

/// `CACHE_GET` KEYS: blob, exp, lru, meta. ARGV: member. Returns the blob (and marks it used).
pub(super) static CACHE_GET: LazyLock<Script> = script!("now.lua", "cache_get.lua");

/// `CACHE_PUT` KEYS: blob, exp, lru, meta. ARGV: member, value, ttl ms, budget, reap limit.
pub(super) static CACHE_PUT: LazyLock<Script> = script!("now.lua", "cache_put.lua");

#[cfg(test)]
mod tests {
    #[test]
    fn preludes_end_their_last_line_so_that_concatenation_never_joins_two() {
        for prelude in [
            include_str!("lua/lease_guard.lua"),
            include_str!("lua/lists.lua"),
            include_str!("lua/now.lua"),
        ] {
            assert!(prelude.ends_with('\n'), "{prelude}");
        }
    }
}
