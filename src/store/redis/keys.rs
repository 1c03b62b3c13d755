//! The Redis key layout, and the names of every key.
//!
//! `P` is `store.redis_key_prefix` (braces are refused, they would move hash slots); `T` is a
//! partition's hash tag `{p:<partition>}` (`%`, `{` and `}` in the name percent-encoded), so
//! everything about one partition lives in one slot:
//!
//! | key                | type   | holds                                                        |
//! |--------------------|--------|--------------------------------------------------------------|
//! | `P:T:m:<key>`      | string | the postcard-encoded [`MutationRecord`](crate::store::MutationRecord) (as in the embedded store) |
//! | `P:T:q`            | zset   | pending keys scored by sequence number: the partition's FIFO  |
//! | `P:T:qb`           | string | body bytes of the pending items (`queue.max_bytes`)            |
//! | `P:T:dead`         | zset   | dead-lettered keys scored by sequence number                   |
//! | `P:T:done`         | zset   | finished keys scored by `finished_at_ms` (retention sweep)     |
//! | `P:T:lease`        | string | `<instance>:<token>` of the replaying instance, with `PX`      |
//! | `P:k:<key>`        | string | key → partition: lookup by idempotency key alone               |
//! | `P:seq`            | string | global acceptance counter (`INCR`)                             |
//! | `P:fence`          | string | lease token counter (`INCR`)                                   |
//! | `P:partitions`     | zset   | partitions holding any state, scored by last registration (ms) |
//! | `P:auth:cred:<principal>` | string | credentials the app offered after a 401 (`*`: anyone's newest), 1 h TTL |
//! | `P:auth:waiting`   | string | present (5 s TTL, renewed) while an instance holds a mutation waiting for them |
//! | `P:{c:<n>}:blob` `:exp` `:lru` `:meta` | hash, zset, zset, hash | cache bucket `n` of the durable cache tier |
//! | `P:cache:buckets`  | string | how many cache buckets there are (set once, by the first instance) |
//! | `P:layout`         | string | the layout version (`codec::REDIS_LAYOUT_VERSION`)          |
//!
//! **Slots.** Every multi-key operation is one Lua script over keys of one slot: enqueue
//! (existence check, FIFO guard, record, queue), a coalescing enqueue (lease absent, folded
//! record and queue tail unchanged, both records, queue slot), update and finish (lease check, record, queue,
//! dead/done list), dead-letter retry, an operator's retry or drop (`operator.rs`), purge of one
//! partition batch, and cache get/put (the four keys of one cache bucket share its tag
//! `{c:<n>}`; an entry's bucket is a hash of its key, so entries spread over the buckets and
//! a cluster's shards). `P:seq`, `P:fence`, `P:partitions` and `P:k:<key>` are only touched by
//! single-key commands or single-key scripts. No operation needs two slots at once, so the
//! layout is valid on Redis Cluster (`cluster.rs`), and the same layout serves one Redis.
//!
//! **Order without a cross-slot transaction.** `P:seq` only hands out numbers (`INCRBY`);
//! order is decided per partition, inside the partition's own slot: the enqueue script refuses
//! a number not above its queue's tail, and the enqueuer takes new numbers (raising `P:seq` to
//! the tail first when it is behind, e.g. after a failover of its shard lost increments). So
//! within a partition FIFO order equals acknowledgement order, whatever shard `P:seq` is on;
//! across partitions there is no order to keep (the contract promises per-partition order).

/// Key names (see the module docs for the layout).
#[derive(Debug, Clone)]
pub(super) struct Keys {
    /// `store.redis_key_prefix`.
    pub(super) prefix: String,
}

impl Keys {
    /// The layout version of everything under the prefix.
    pub(super) fn layout(&self) -> String {
        format!("{}:layout", self.prefix)
    }

    pub(super) fn seq(&self) -> String {
        format!("{}:seq", self.prefix)
    }

    pub(super) fn fence(&self) -> String {
        format!("{}:fence", self.prefix)
    }

    pub(super) fn partitions(&self) -> String {
        format!("{}:partitions", self.prefix)
    }

    pub(super) fn index(&self, key: &str) -> String {
        format!("{}:k:{key}", self.prefix)
    }

    pub(super) fn partition(&self, partition: &str) -> PartitionKeys {
        PartitionKeys {
            base: format!("{}:{{p:{}}}", self.prefix, escape_tag(partition)),
        }
    }

    /// Fresh credentials shared for a principal (`*`: the newest of anyone's).
    pub(super) fn credentials(&self, principal: &str) -> String {
        format!("{}:auth:cred:{principal}", self.prefix)
    }

    /// Present while some instance has a mutation waiting for credentials.
    pub(super) fn auth_waiting(&self) -> String {
        format!("{}:auth:waiting", self.prefix)
    }

    /// The keys of cache bucket `bucket` (hash tag `{c:<bucket>}`): blob, exp, lru, meta.
    pub(super) fn cache(&self, bucket: u32) -> [String; 4] {
        ["blob", "exp", "lru", "meta"].map(|k| format!("{}:{{c:{bucket}}}:{k}", self.prefix))
    }

    /// How many cache buckets there are (set by the first instance, read by all).
    pub(super) fn cache_buckets(&self) -> String {
        format!("{}:cache:buckets", self.prefix)
    }

    /// The cache of layout version 1, all under `{c}`: deleted at start.
    pub(super) fn legacy_cache(&self) -> [String; 4] {
        ["blob", "exp", "lru", "meta"].map(|k| format!("{}:{{c}}:{k}", self.prefix))
    }
}

/// The keys of one partition, all in the slot of its hash tag.
pub(super) struct PartitionKeys {
    base: String,
}

impl PartitionKeys {
    pub(super) fn queue(&self) -> String {
        format!("{}:q", self.base)
    }

    /// Body bytes of the pending items, kept by the scripts that move items on and off the
    /// queue.
    pub(super) fn queued_bytes(&self) -> String {
        format!("{}:qb", self.base)
    }
    pub(super) fn dead(&self) -> String {
        format!("{}:dead", self.base)
    }

    pub(super) fn done(&self) -> String {
        format!("{}:done", self.base)
    }

    pub(super) fn lease(&self) -> String {
        format!("{}:lease", self.base)
    }

    pub(super) fn record(&self, key: &str) -> String {
        format!("{}:m:{key}", self.base)
    }
}

/// Percent-encode the characters that would end or nest a hash tag (and `%` itself), so that
/// every partition name maps to its own, well-formed tag.
fn escape_tag(partition: &str) -> String {
    let mut out = String::with_capacity(partition.len());
    for c in partition.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_cannot_break_out_of_their_hash_tag() {
        let keys = Keys {
            prefix: "outpost".into(),
        };
        assert_eq!(keys.partition("orders").queue(), "outpost:{p:orders}:q");
        assert_eq!(
            keys.partition("a}b{c%").record("k"),
            "outpost:{p:a%7Db%7Bc%25}:m:k"
        );
        // Distinct names stay distinct after escaping.
        assert_ne!(escape_tag("a%7D"), escape_tag("a}"));
    }
}
