//! The one encoding of stored mutation records, with a format version.
//!
//! Both backends store a [`MutationRecord`] as the bytes [`encode`] makes and read it back with
//! [`decode`], which upgrades records written by earlier versions in this one place:
//!
//! - **Version 0** (outpost up to 2026-11-23, unmarked): the postcard encoding of the record
//!   as it was then (`RecordV0`, no `identity`). It starts with the key's length, never 0,
//!   since keys are 1–255 characters.
//! - **Version 1** (current): a `0x00` marker, the version byte, then the postcard encoding of
//!   [`MutationRecord`] (adds `identity`, the caller the key belongs to).
//!
//! Cache blobs (cached responses and `Vary` name lists, [`encode_cached`]/[`decode_cached`])
//! carry a version the same way: version 0 (unmarked) and version 1 (marker, version, postcard)
//! hold the same layout; a blob of a newer version is not read (the cache treats it as a miss).
//!
//! A record of a newer version than this build knows is refused with
//! [`StoreError::NewerFormat`] naming both versions, never guessed at. Golden-bytes tests below
//! pin each version's encoding; `tests/fixtures/` holds a store written by an earlier release
//! that the test suite opens and drains.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{MutationRecord, MutationStatus, StoreError, StoredRequest, StoredResponse};

/// The layout of a data directory (tables) this build writes: stored in the store itself
/// (`meta.layout_version`). Version 0 is the layout of 2026-11-23, which had no marker; opening
/// one marks it version 1 (the tables are the same, the records inside are upgraded on read). A
/// newer one is refused. A Redis key prefix has its own version, [`REDIS_LAYOUT_VERSION`]
/// (version 0 and 1 as here).
pub const LAYOUT_VERSION: u64 = 1;

/// The layout of a Redis key prefix this build writes (`<prefix>:layout`); it moved apart from
/// the data directory's [`LAYOUT_VERSION`] at version 2:
///
/// - **Version 1**: as the data directory's version 1; the cache tier under one hash tag
///   `{c}` (one cluster slot).
/// - **Version 2** (current): the cache tier spread over `<prefix>:cache:buckets` buckets, each
///   under its own hash tag `{c:<n>}`, so that a Redis Cluster spreads it over its shards.
///   Queue, records, leases and indexes are unchanged. Opening a version-1 prefix marks it
///   version 2 and deletes the old `{c}` cache (a cache: the entries are fetched again).
pub const REDIS_LAYOUT_VERSION: u64 = 2;

/// Whether a store whose layout is `found` (`None`: unmarked, version 0) can be used by a
/// build that writes layout `supported`, and the version to mark it with.
pub fn check_layout(
    what: &'static str,
    found: Option<u64>,
    supported: u64,
) -> Result<u64, StoreError> {
    match found {
        Some(v) if v > supported => Err(StoreError::NewerFormat {
            what,
            found: u32::try_from(v).unwrap_or(u32::MAX),
            supported: u32::try_from(supported).unwrap_or(u32::MAX),
        }),
        _ => Ok(supported),
    }
}

/// The record format this build writes.
pub const RECORD_VERSION: u8 = 1;

/// The marker in front of every versioned record.
const MARKER: u8 = 0x00;

/// Encode a record in the current format.
pub fn encode(record: &MutationRecord) -> Result<Vec<u8>, StoreError> {
    // Sized for the body plus room for the rest, and written in place: a large body is copied
    // once, not into a doubling scratch buffer and then again.
    let headers: usize = record
        .request
        .headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 4)
        .sum();
    let mut out = Vec::with_capacity(record.request.body.len() + headers + 512);
    out.extend_from_slice(&[MARKER, RECORD_VERSION]);
    Ok(postcard::to_extend(record, out)?)
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

/// The length of a stored record's request body, read without decoding the record: its fields
/// up to the body are borrowed or skipped, nothing is allocated but the header list's slots.
/// For the queue's byte count when a record leaves it. The fields before the body are the same
/// in versions 0 and 1; anything that does not read as expected is decoded whole.
pub fn body_len(bytes: &[u8]) -> Result<u64, StoreError> {
    let rest = match bytes {
        [MARKER, 1, rest @ ..] => rest,
        [MARKER, ..] => return decode(bytes).map(|r| r.request.body.len() as u64),
        _ => bytes,
    };
    match postcard::take_from_bytes::<RecordHead<'_>>(rest) {
        Ok((head, _)) => Ok(head.request.body.len() as u64),
        Err(_) => decode(bytes).map(|r| r.request.body.len() as u64),
    }
}

/// The fields of a stored record up to and including its request, borrowed (see [`body_len`]):
/// in the order of [`MutationRecord`]'s, which a test pins.
#[derive(Deserialize)]
#[allow(dead_code)] // Read only for the position of the body.
struct RecordHead<'a> {
    key: &'a str,
    fingerprint: [u8; 32],
    partition: &'a str,
    seq: u64,
    accepted_at_ms: u64,
    status: MutationStatus,
    attempts: u32,
    next_attempt_at_ms: u64,
    principal: Option<&'a str>,
    route: &'a str,
    #[serde(borrow)]
    request: RequestHead<'a>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct RequestHead<'a> {
    method: &'a str,
    path_and_query: &'a str,
    #[serde(borrow)]
    headers: Vec<(&'a str, &'a [u8])>,
    body: &'a [u8],
}

/// The cache blob format this build writes.
pub const CACHE_VERSION: u8 = 1;

/// Encode a cache blob (a cached response or a `Vary` list) in the current format.
pub fn encode_cached<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![MARKER, CACHE_VERSION];
    out.extend_from_slice(&postcard::to_stdvec(value)?);
    Ok(out)
}

/// Decode a cache blob of the current or an earlier format.
pub fn decode_cached<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    match bytes {
        [MARKER, 1, rest @ ..] => Ok(postcard::from_bytes(rest)?),
        // A version-0 blob starts with a length or a status, and is a lone 0x00 only as an
        // empty list: two bytes or more after a marker are a versioned blob.
        [MARKER, version, ..] => Err(StoreError::NewerFormat {
            what: "cache entry",
            found: u32::from(*version),
            supported: u32::from(CACHE_VERSION),
        }),
        _ => Ok(postcard::from_bytes(bytes)?),
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

    #[test]
    fn body_len_reads_the_body_of_both_versions_without_decoding() {
        let mut record = sample();
        record.request.body = Bytes::from(vec![5u8; 1000]);
        record
            .request
            .headers
            .push(("x-a".into(), Bytes::from_static(b"b")));
        record.response = Some(StoredResponse {
            status: 201,
            headers: vec![("etag".into(), Bytes::from_static(b"1"))],
            body: Bytes::from_static(b"{\"id\":1}"),
        });
        let v1 = encode(&record).expect("encode");
        assert_eq!(body_len(&v1).expect("v1"), 1000);
        let v0 = postcard::to_allocvec(&RecordV0 {
            key: record.key.clone(),
            fingerprint: record.fingerprint,
            partition: record.partition.clone(),
            seq: record.seq,
            accepted_at_ms: record.accepted_at_ms,
            status: record.status,
            attempts: record.attempts,
            next_attempt_at_ms: record.next_attempt_at_ms,
            principal: record.principal.clone(),
            route: record.route.clone(),
            request: record.request.clone(),
            outcome: None,
            response: None,
            finished_at_ms: None,
        })
        .expect("encode v0");
        assert_eq!(body_len(&v0).expect("v0"), 1000);
        record.request.body = Bytes::new();
        assert_eq!(
            body_len(&encode(&record).expect("encode")).expect("empty body"),
            0
        );
        // A newer version is refused, as by decode.
        let mut newer = v1.clone();
        newer[1] = RECORD_VERSION + 1;
        assert!(body_len(&newer).is_err());
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
    fn cache_blobs_of_both_versions_decode() {
        let vary = vec!["accept".to_string()];
        let v1 = encode_cached(&vary).expect("encode");
        assert_eq!(&v1[..2], [MARKER, CACHE_VERSION]);
        assert_eq!(decode_cached::<Vec<String>>(&v1).expect("v1"), vary);
        let v0 = postcard::to_stdvec(&vary).expect("v0");
        assert_eq!(decode_cached::<Vec<String>>(&v0).expect("v0"), vary);
        let empty_v0 = postcard::to_stdvec(&Vec::<String>::new()).expect("v0");
        assert_eq!(empty_v0, [0]);
        assert!(
            decode_cached::<Vec<String>>(&empty_v0)
                .expect("v0")
                .is_empty()
        );
        let newer = [MARKER, CACHE_VERSION + 1, 0];
        assert!(decode_cached::<Vec<String>>(&newer).is_err());
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
