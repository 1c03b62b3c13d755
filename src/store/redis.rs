//! The Redis backend (being written): several instances share one queue and one cache.

#![allow(missing_docs)]

/// Placeholder until the Redis backend lands.
pub struct RedisStore;
