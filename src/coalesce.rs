//! Coalescing queued writes (route `coalesce = true`): what a new PUT, PATCH or DELETE does with
//! the pending write of the same URI it follows.
//!
//! The rules (the README's "Coalescing queued writes" gives the reasoning):
//! - Only into the *newest* pending item of the partition with the same path and query, found
//!   among the partition's last [`WINDOW`] items (an older one
//!   is not looked for: the new write then queues at the tail, unfolded), and only when that item is a PUT or PATCH of
//!   the same caller (identity) and route that was never sent (`queued`, no attempt). Any other
//!   item of that URI in between (a POST, a DELETE, another caller's write, one that was sent
//!   once) stops it: folding across it would reorder writes to the URI.
//! - A newer PUT or DELETE replaces the older write; a newer JSON merge patch is merged into it
//!   (RFC 7396): into a PUT's body (the result stays a PUT), or composed with an older merge
//!   patch. A merge that cannot be expressed as one request (a patch into a non-JSON body, two
//!   patches whose composition RFC 7396 cannot express) is not folded.
//! - The surviving request carries the newer write's key and headers (its credentials are the
//!   freshest), the older write's preconditions when it had any (they name the version the
//!   first change was based on), and takes the older write's place in the partition.
//!
//! The store applies the fold atomically ([`crate::store::Queue::enqueue_coalesced`]) and only
//! while no replayer holds the partition, so an item in flight is never touched.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::overlay::merge_patch;
use crate::store::{MutationRecord, MutationStatus, StoredRequest};

/// How many of a partition's newest pending items are searched for the write to fold into.
pub const WINDOW: usize = 1024;
/// How many are read first (the write to fold into is usually among them).
pub const FIRST_LOOK: usize = 32;

/// Request headers that make a write conditional.
pub const PRECONDITIONS: [&str; 3] = ["if-match", "if-unmodified-since", "if-none-match"];

/// The pending write of `newer`'s URI that `newer` may fold into: the newest of `tail` (newest
/// first) with the same path and query, if it may be folded at all.
pub fn target<'a>(
    tail: &'a [MutationRecord],
    newer: &MutationRecord,
) -> Option<&'a MutationRecord> {
    let older = tail
        .iter()
        .find(|r| r.request.path_and_query == newer.request.path_and_query)?;
    let foldable = older.identity.is_some()
        && older.identity == newer.identity
        && older.route == newer.route
        && older.partition == newer.partition
        && older.status == MutationStatus::Queued
        && older.attempts == 0
        && matches!(older.request.method.as_str(), "PUT" | "PATCH")
        && matches!(newer.request.method.as_str(), "PUT" | "PATCH" | "DELETE");
    foldable.then_some(older)
}

/// The request that carries both `older` and `newer` (see the module docs), or `None` when they
/// cannot be one request or it would be over `max_body` bytes.
pub fn fold(older: &StoredRequest, newer: &StoredRequest, max_body: u64) -> Option<StoredRequest> {
    let mut folded = match newer.method.as_str() {
        "PUT" | "DELETE" => newer.clone(),
        "PATCH" => {
            if !is_json(newer) || !is_json(older) {
                return None;
            }
            let patch: Value = serde_json::from_slice(&newer.body).ok()?;
            let mut base: Value = serde_json::from_slice(&older.body).ok()?;
            match older.method.as_str() {
                "PUT" => merge_patch(&mut base, &patch),
                "PATCH" => base = compose(&base, &patch)?,
                _ => return None,
            }
            let mut merged = newer.clone();
            merged.method = older.method.clone();
            merged.body = Bytes::from(serde_json::to_vec(&base).ok()?);
            set_headers(&mut merged.headers, &older.headers, &["content-type"]);
            merged
        }
        _ => return None,
    };
    if older.headers.iter().any(|(n, _)| is_precondition(n)) {
        // With the marker of a captured version, if it was one.
        let mut names = PRECONDITIONS.to_vec();
        names.push(crate::outbox::CAPTURED_VERSION);
        set_headers(&mut folded.headers, &older.headers, &names);
    }
    (folded.body.len() as u64 <= max_body).then_some(folded)
}

/// Whether `name` (lower case) is a precondition header.
pub fn is_precondition(name: &str) -> bool {
    PRECONDITIONS.contains(&name)
}

/// Replace the headers named in `names` of `headers` with those of `from`.
fn set_headers(headers: &mut Vec<(String, Bytes)>, from: &[(String, Bytes)], names: &[&str]) {
    headers.retain(|(n, _)| !names.contains(&n.as_str()));
    headers.extend(
        from.iter()
            .filter(|(n, _)| names.contains(&n.as_str()))
            .cloned(),
    );
}

/// Whether the request's body is declared JSON (`application/json`, `…+json`, including
/// `application/merge-patch+json`).
fn is_json(request: &StoredRequest) -> bool {
    request
        .headers
        .iter()
        .find(|(n, _)| n == "content-type")
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
        .map(|v| {
            let essence = v
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            essence == "application/json" || essence.ends_with("+json")
        })
        .unwrap_or(false)
}

/// One merge patch with the effect of applying `first`, then `second` (RFC 7396), or `None`
/// when no merge patch has it: `second` merges an object into a member `first` replaces with a
/// non-object or removes, which a merge patch would merge into the target's old member instead.
pub fn compose(first: &Value, second: &Value) -> Option<Value> {
    let Value::Object(second_map) = second else {
        return Some(second.clone());
    };
    let Value::Object(first_map) = first else {
        // `first` replaces the whole document with a non-object and `second` merges an object
        // into that: a replacement by an object, which a merge patch cannot express.
        return None;
    };
    let mut out: Map<String, Value> = first_map.clone();
    for (k, v) in second_map {
        let composed = match (first_map.get(k), v) {
            (_, Value::Null) | (None, _) => v.clone(),
            (Some(Value::Object(_)), Value::Object(_)) => compose(&first_map[k], v)?,
            // `first` set or removed the member and `second` merges an object into it: the
            // result is exactly that object, which a patch would merge, not set.
            (Some(_), Value::Object(_)) => return None,
            (Some(_), _) => v.clone(),
        };
        out.insert(k.clone(), composed);
    }
    Some(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(
        method: &str,
        content_type: &str,
        body: &str,
        extra: &[(&str, &str)],
    ) -> StoredRequest {
        let mut headers = vec![(
            "content-type".to_string(),
            Bytes::from(content_type.to_string()),
        )];
        headers.extend(
            extra
                .iter()
                .map(|(n, v)| (n.to_string(), Bytes::from(v.to_string()))),
        );
        StoredRequest {
            method: method.into(),
            path_and_query: "/doc/1".into(),
            headers,
            body: Bytes::from(body.to_string()),
        }
    }

    fn body(r: &StoredRequest) -> Value {
        serde_json::from_slice(&r.body).expect("json")
    }

    /// Applying the composed patch equals applying both, for every RFC 7396 example pair that
    /// composes.
    #[test]
    fn composed_patches_apply_like_both_in_turn() {
        let targets = [
            json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1]}),
            json!({}),
            json!([1]),
        ];
        let patches = [
            json!({"a": 2}),
            json!({"b": {"c": null}}),
            json!({"b": {"x": 1}}),
            json!({"e": null}),
            json!({"a": null, "f": {"g": 1}}),
            json!({"b": null}),
        ];
        for t in &targets {
            for p1 in &patches {
                for p2 in &patches {
                    let mut both = t.clone();
                    merge_patch(&mut both, p1);
                    merge_patch(&mut both, p2);
                    if let Some(c) = compose(p1, p2) {
                        let mut once = t.clone();
                        merge_patch(&mut once, &c);
                        assert_eq!(once, both, "{t} {p1} {p2} -> {c}");
                    }
                }
            }
        }
        assert_eq!(compose(&json!({"b": null}), &json!({"b": {"x": 1}})), None);
        assert_eq!(
            compose(&json!({"a": 1}), &json!({"b": 2})),
            Some(json!({"a": 1, "b": 2}))
        );
    }

    fn pending(key: &str, method: &str, path: &str, identity: u8) -> MutationRecord {
        let mut r = crate::store::conformance::record(key, "upstream");
        r.request = request(method, "application/json", "{}", &[]);
        r.request.path_and_query = path.into();
        r.identity = Some([identity; 32]);
        r
    }

    /// Only the newest pending item of the URI, and only a never-sent PUT/PATCH of the same
    /// caller; never for a POST, never across another item of the URI.
    #[test]
    fn the_target_is_the_newest_write_of_the_uri_of_the_same_caller() {
        let newer = pending("n", "PATCH", "/doc/1", 1);
        let older = pending("o", "PUT", "/doc/1", 1);
        let other_uri = pending("x", "PUT", "/doc/2", 1);
        let tail = [other_uri.clone(), older.clone()];
        assert_eq!(target(&tail, &newer).map(|r| r.key.as_str()), Some("o"));
        let bob = pending("b", "PATCH", "/doc/1", 2);
        assert!(
            target(&[bob, older.clone()], &newer).is_none(),
            "across a caller"
        );
        assert!(target(&[pending("b", "PATCH", "/doc/1", 2)], &newer).is_none());
        let post = pending("p", "POST", "/doc/1", 1);
        assert!(
            target(&[post, older.clone()], &newer).is_none(),
            "across a POST"
        );
        assert!(
            target(&tail, &pending("n", "POST", "/doc/1", 1)).is_none(),
            "a POST"
        );
        let mut sent = older.clone();
        sent.attempts = 1;
        assert!(target(&[sent], &newer).is_none(), "sent once");
        let mut waiting = older;
        waiting.status = MutationStatus::AuthRequired;
        assert!(
            target(&[waiting], &newer).is_none(),
            "waiting for credentials"
        );
    }

    #[test]
    fn a_patch_merges_into_a_put_which_stays_a_put() {
        let put = request(
            "PUT",
            "application/json",
            r#"{"t":"a","n":1}"#,
            &[("if-match", "\"v1\"")],
        );
        let patch = request(
            "PATCH",
            "application/merge-patch+json",
            r#"{"n":null,"x":2}"#,
            &[],
        );
        let folded = fold(&put, &patch, 1 << 20).expect("folds");
        assert_eq!(folded.method, "PUT");
        assert_eq!(body(&folded), json!({"t": "a", "x": 2}));
        let ct: Vec<_> = folded
            .headers
            .iter()
            .filter(|(n, _)| n == "content-type")
            .collect();
        assert_eq!(ct.len(), 1);
        assert_eq!(
            ct[0].1,
            Bytes::from_static(b"application/json"),
            "the PUT's type"
        );
        assert!(
            folded
                .headers
                .iter()
                .any(|(n, v)| n == "if-match" && v == "\"v1\""),
            "the older precondition is kept"
        );
    }

    #[test]
    fn puts_and_deletes_replace_and_non_json_patches_do_not_fold() {
        let a = request("PATCH", "application/json", r#"{"a":1}"#, &[]);
        let put = request(
            "PUT",
            "application/json",
            r#"{"b":1}"#,
            &[("if-match", "\"v9\"")],
        );
        let folded = fold(&a, &put, 1 << 20).expect("folds");
        assert_eq!(body(&folded), json!({"b": 1}));
        assert!(
            folded.headers.iter().any(|(n, _)| n == "if-match"),
            "its own"
        );
        let delete = request("DELETE", "text/plain", "", &[]);
        assert_eq!(fold(&a, &delete, 1 << 20).expect("folds").method, "DELETE");
        let text = request("PATCH", "text/plain", "x", &[]);
        assert!(fold(&a, &text, 1 << 20).is_none());
        assert!(fold(&a, &put, 3).is_none(), "over the body limit");
    }
}
