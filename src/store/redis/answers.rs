//! Reading Redis's answers, and the errors the backend makes of them: an unexpected answer,
//! a call that took too long, the same error for every caller of a failed group.

use std::time::Duration;

use redis::{ErrorKind, FromRedisValue, RedisError, Value};

use crate::store::StoreError;

/// A call that got no answer within `limit`.
pub(super) fn timed_out(what: &'static str, limit: Duration) -> StoreError {
    redis_error(
        ErrorKind::Io,
        "no answer in time",
        format!("{what} took longer than {limit:?}"),
    )
}

/// The same error again, for every enqueue of a group that failed together.
pub(super) fn copy_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Embedded(m) => StoreError::Embedded(m.clone()),
        StoreError::Redis(e) => StoreError::Redis(e.clone()),
        StoreError::Codec(e) => StoreError::Codec(e.clone()),
        StoreError::Closed => StoreError::Closed,
        StoreError::Task(m) => StoreError::Task(m.clone()),
        StoreError::Replicas { got, wanted } => StoreError::Replicas {
            got: *got,
            wanted: *wanted,
        },
        StoreError::LeaseLost { partition } => StoreError::LeaseLost {
            partition: partition.clone(),
        },
        StoreError::NotQueued { key } => StoreError::NotQueued { key: key.clone() },
        StoreError::NewerFormat {
            what,
            found,
            supported,
        } => StoreError::NewerFormat {
            what,
            found: *found,
            supported: *supported,
        },
    }
}

/// An error of this backend, in Redis's error type (so callers see one kind of error).
pub(super) fn redis_error(kind: ErrorKind, what: &'static str, detail: String) -> StoreError {
    StoreError::Redis(RedisError::from((kind, what, detail)))
}

/// An answer a command or script never gives when things are as this backend expects.
pub(super) fn unexpected(what: &'static str, value: &Value) -> StoreError {
    redis_error(
        ErrorKind::UnexpectedReturnType,
        "unexpected answer",
        format!("{what}: {value:?}"),
    )
}

/// One value of an answer, as `T`.
pub(super) fn parse<T: FromRedisValue>(value: &Value) -> Result<T, StoreError> {
    redis::from_redis_value_ref(value).map_err(|e| StoreError::Redis(e.into()))
}

/// Members and scores of `ZRANGE ... WITHSCORES` (a flat array in RESP2, pairs in RESP3).
pub(super) fn scored(value: Value) -> Result<Vec<(String, f64)>, StoreError> {
    let Value::Array(items) = value else {
        return Err(unexpected("ZRANGE WITHSCORES", &value));
    };
    if items.iter().all(|i| matches!(i, Value::Array(_))) {
        return items
            .iter()
            .map(parse::<(String, f64)>)
            .collect::<Result<_, _>>();
    }
    items
        .chunks(2)
        .map(|pair| match pair {
            [member, score] => Ok((parse::<String>(member)?, parse::<f64>(score)?)),
            _ => Err(unexpected(
                "ZRANGE WITHSCORES",
                &Value::Array(pair.to_vec()),
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zrange_withscores_parses_flat_and_paired_answers() {
        let flat = Value::Array(vec![
            Value::BulkString(b"a".to_vec()),
            Value::BulkString(b"1".to_vec()),
            Value::BulkString(b"b".to_vec()),
            Value::BulkString(b"2.5".to_vec()),
        ]);
        assert_eq!(
            scored(flat).expect("flat"),
            [("a".to_string(), 1.0), ("b".to_string(), 2.5)]
        );
        let paired = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"a".to_vec()),
            Value::Double(3.0),
        ])]);
        assert_eq!(scored(paired).expect("paired"), [("a".to_string(), 3.0)]);
    }
}
