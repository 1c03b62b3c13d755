//! The one encoding of stored mutation records, with a format version.
//!
//! Both backends store a [`MutationRecord`] as the bytes [`encode`] makes and read it back with
//! [`decode`], which upgrades records written by earlier versions in this one place:
//!
//! - **Version 0** (outpost up to 2026-11-23, unmarked): the postcard encoding of the record
//!   as it was then ([`RecordV0`], no `identity`). It starts with the key's length, never 0,
//!   since keys are 1–255 characters.
//! - **Version 1** (current): a `0x00` marker, the version byte, then the postcard encoding of
//!   [`MutationRecord`] (adds `identity`, the caller the key belongs to).
//!
//! A record of a newer version than this build knows is refused with
//! [`StoreError::NewerFormat`] naming both versions, never guessed at. Golden-bytes tests below
//! pin each version's encoding; `tests/fixtures/` holds a store written by an earlier release
//! that the test suite opens and drains.

use serde::Deserialize;

use super::{MutationRecord, MutationStatus, StoreError, StoredRequest, StoredResponse};

/// The record format this build writes.
pub const RECORD_VERSION: u8 = 1;

/// The marker in front of every versioned record.
const MARKER: u8 = 0x00;

/// Encode a record in the current format.
pub fn encode(record: &MutationRecord) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![MARKER, RECORD_VERSION];
    out.extend_from_slice(&postcard::to_stdvec(record)?);
    Ok(out)
}

/// Decode a record of the current or any earlier format.
pub fn decode(bytes: &[u8]) -> Result<MutationRecord, StoreError> {
    match bytes {
        [MARKER, 1, rest @ ..] => Ok(postcard::from_bytes(rest)?),
        [MARKER, version, ..] => Err(StoreError::NewerFormat {
            what: "mutation record",
            found: u32::from(*version),
            supported: u32::from(RECORD_VERSION),
        }),
        _ => Ok(postcard::from_bytes::<RecordV0>(bytes)?.into()),
    }
}

/// A mutation record as version 0 stored it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct RecordV0 {
    key: String,
    fingerprint: [u8; 32],
    partition: String,
    seq: u64,
    accepted_at_ms: u64,
    status: MutationStatus,
    attempts: u32,
    next_attempt_at_ms: u64,
    principal: Option<String>,
    route: String,
    request: StoredRequest,
    outcome: Option<String>,
    response: Option<StoredResponse>,
    finished_at_ms: Option<u64>,
}

impl From<RecordV0> for MutationRecord {
    fn from(v0: RecordV0) -> Self {
        MutationRecord {
            key: v0.key,
            fingerprint: v0.fingerprint,
            partition: v0.partition,
            seq: v0.seq,
            accepted_at_ms: v0.accepted_at_ms,
            status: v0.status,
            attempts: v0.attempts,
            next_attempt_at_ms: v0.next_attempt_at_ms,
            principal: v0.principal,
            route: v0.route,
            request: v0.request,
            outcome: v0.outcome,
            response: v0.response,
            finished_at_ms: v0.finished_at_ms,
            // Unknown: such a record answers only the operator, never an app.
            identity: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn sample() -> MutationRecord {
        MutationRecord {
            key: "k1".into(),
            fingerprint: [7; 32],
            partition: "upstream".into(),
            seq: 3,
            accepted_at_ms: 1_700_000_000_000,
            status: MutationStatus::Queued,
            attempts: 1,
            next_attempt_at_ms: 1_700_000_000_500,
            principal: Some("alice".into()),
            route: "orders".into(),
            request: StoredRequest {
                method: "POST".into(),
                path_and_query: "/orders".into(),
                headers: vec![("content-type".into(), Bytes::from_static(b"a/j"))],
                body: Bytes::from_static(b"{}"),
            },
            outcome: None,
            response: None,
            finished_at_ms: None,
            identity: Some([9; 32]),
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Today's encoding, pinned: changing it needs a new version and an upgrade in `decode`.
    const V1_GOLDEN: &str = "0001026b31070707070707070707070707070707070707070707070707070707070707070708757073747265616d0380d095ffbc310001f4d395ffbc310105616c696365066f726465727304504f5354072f6f7264657273010c636f6e74656e742d7479706503612f6a027b7d000000010909090909090909090909090909090909090909090909090909090909090909";

    /// Version 0 as the release of 2026-11-23 wrote it.
    const V0_GOLDEN: &str = "026b31070707070707070707070707070707070707070707070707070707070707070708757073747265616d0380d095ffbc310001f4d395ffbc310105616c696365066f726465727304504f5354072f6f7264657273010c636f6e74656e742d7479706503612f6a027b7d000000";

    #[test]
    fn current_encoding_is_pinned_and_round_trips() {
        let bytes = encode(&sample()).expect("encode");
        assert_eq!(hex(&bytes), V1_GOLDEN);
        assert_eq!(decode(&bytes).expect("decode"), sample());
    }

    #[test]
    fn version_0_records_are_upgraded() {
        let bytes: Vec<u8> = (0..V0_GOLDEN.len() / 2)
            .map(|i| u8::from_str_radix(&V0_GOLDEN[2 * i..2 * i + 2], 16).expect("hex"))
            .collect();
        let record = decode(&bytes).expect("decode v0");
        let mut expected = sample();
        expected.identity = None;
        assert_eq!(record, expected);
    }

    #[test]
    fn newer_versions_are_refused_naming_both() {
        let mut bytes = encode(&sample()).expect("encode");
        bytes[1] = RECORD_VERSION + 1;
        let err = decode(&bytes).expect_err("newer refused");
        let text = err.to_string();
        assert!(text.contains('2') && text.contains('1'), "{text}");
    }
}
