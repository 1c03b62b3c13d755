//! An operator's edited retry of a dead letter: `POST /dead-letters/{key}/retry` with
//! `{"body": …, "headers": {…}}`.
//!
//! - `body`: the new request body. A JSON string is sent as its text; any other JSON value is
//!   sent serialised. Left out, the stored body stays.
//! - `headers`: names to set (a string) or remove (`null`), case-insensitive. Framing and
//!   routing headers (`Content-Length`, `Transfer-Encoding`, `Host`, `Connection`, hop-by-hop
//!   ones) and `Idempotency-Key` cannot be edited.
//!
//! The idempotency key stays only while the body is unchanged: the upstream may have stored
//! the key with the first body's answer, so an edited body goes on under a new key derived
//! from the old one (`<key>.edit-1`, `.edit-2`, … the first free one), and the dead letter is
//! finished pointing to it (outcome `edited: retried as <new key>`). Either way the retried
//! request carries `Outpost-Edited-From: <old key>`, which the status documents show as
//! `edited_from` (and the upstream sees, as it sees `Outpost-Accepted-At`).

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Response, StatusCode};
use serde::Deserialize;

use super::{AdminState, not_found, store_unavailable};
use crate::body::ProxyBody;
use crate::error::json_response;
use crate::events::Event;
use crate::store::{DeadLetterEdit, Enqueued, MutationRecord, MutationStatus, now_ms};

/// The request header naming the key an edited retry came from.
pub const EDITED_FROM: &str = crate::store::EDITED_FROM_HEADER;

/// Headers an edit may not touch.
const FIXED: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "idempotency-key",
    EDITED_FROM,
];

/// What an operator sent with a retry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edit {
    /// The new body (see the module docs).
    #[serde(default)]
    body: Option<serde_json::Value>,
    /// Headers to set (`Some`) or remove (`None`).
    #[serde(default)]
    headers: BTreeMap<String, Option<String>>,
}

impl Edit {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.body.is_none() && self.headers.is_empty()
    }

    fn body_bytes(&self) -> Option<Bytes> {
        self.body.as_ref().map(|v| match v {
            serde_json::Value::String(s) => Bytes::from(s.clone()),
            other => Bytes::from(other.to_string()),
        })
    }

    /// The stored headers with the edit applied and the `Outpost-Edited-From` marker set.
    fn apply_headers(
        &self,
        stored: &[(String, Bytes)],
        from: &str,
    ) -> Result<Vec<(String, Bytes)>, String> {
        let mut headers: Vec<(String, Bytes)> = stored
            .iter()
            .filter(|(n, _)| n != EDITED_FROM)
            .cloned()
            .collect();
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a header name"))?;
            if FIXED.contains(&name.as_str()) {
                return Err(format!("{name} cannot be edited"));
            }
            headers.retain(|(n, _)| n != name.as_str());
            if let Some(value) = value {
                HeaderValue::from_str(value)
                    .map_err(|_| format!("the value of {name} is not a header value"))?;
                headers.push((name.as_str().to_string(), Bytes::from(value.clone())));
            }
        }
        headers.push((EDITED_FROM.to_string(), Bytes::from(from.to_string())));
        Ok(headers)
    }
}

/// Retry the dead letter `key` with `edit` applied (see the module docs).
pub async fn retry_edited(state: &AdminState, key: &str, edit: Edit) -> Response<ProxyBody> {
    let record = match state.store.mutation(key).await {
        Ok(Some(r)) if r.status.is_dead_letter() => r,
        Ok(_) => return not_found(),
        Err(e) => return store_unavailable(&e),
    };
    let headers = match edit.apply_headers(&record.request.headers, key) {
        Ok(h) => h,
        Err(message) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": "bad_edit", "message": message}),
            );
        }
    };
    let new_body = edit.body_bytes().filter(|b| *b != record.request.body);
    let Some(body) = new_body else {
        // The same body: the same key, with the edited headers.
        return match state
            .store
            .edit_dead_letter(key, DeadLetterEdit::Headers(headers))
            .await
        {
            Ok(true) => done(state, key, None),
            Ok(false) => not_found(),
            Err(e) => store_unavailable(&e),
        };
    };
    let new_key = match free_key(state, key).await {
        Ok(Some(k)) => k,
        Ok(None) => {
            return json_response(
                StatusCode::CONFLICT,
                &serde_json::json!({"error": "too_many_edits", "idempotency_key": key}),
            );
        }
        Err(resp) => return resp,
    };
    let edited = edited_record(&record, &new_key, headers, body);
    match state.store.enqueue(edited).await {
        Ok(Enqueued::Accepted { .. }) => {}
        Ok(Enqueued::Existing(_)) => {
            return json_response(
                StatusCode::CONFLICT,
                &serde_json::json!({"error": "edited_concurrently", "idempotency_key": key}),
            );
        }
        Err(e) => return store_unavailable(&e),
    }
    match state
        .store
        .edit_dead_letter(key, DeadLetterEdit::Superseded(new_key.clone()))
        .await
    {
        Ok(true) => done(state, key, Some(new_key)),
        // Retried or dropped meanwhile by someone else: take the edited copy back.
        Ok(false) => {
            if let Err(e) = state.store.drop_mutation(&new_key).await {
                tracing::warn!(key = %new_key, "could not withdraw an edited retry: {e}");
            }
            not_found()
        }
        Err(e) => store_unavailable(&e),
    }
}

fn done(state: &AdminState, key: &str, new_key: Option<String>) -> Response<ProxyBody> {
    state.activity.wake();
    state.events.emit(Event::Operator {
        key: key.to_string(),
        action: "retried_edited".into(),
        new_key: new_key.clone(),
    });
    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "idempotency_key": key,
            "retried": true,
            "edited": true,
            "new_key": new_key,
        }),
    )
}

/// The first `<key>.edit-N` not in the store (`None` after 100 tries).
async fn free_key(state: &AdminState, key: &str) -> Result<Option<String>, Response<ProxyBody>> {
    // Keys are at most 255 visible ASCII characters: shorten the stem if needed.
    let stem = key.get(..key.len().min(240)).unwrap_or(key);
    for n in 1..=100 {
        let candidate = format!("{stem}.edit-{n}");
        match state.store.mutation(&candidate).await {
            Ok(None) => return Ok(Some(candidate)),
            Ok(Some(_)) => continue,
            Err(e) => return Err(store_unavailable(&e)),
        }
    }
    Ok(None)
}

/// A fresh queued record for the edited request, owned by the same caller.
fn edited_record(
    old: &MutationRecord,
    new_key: &str,
    headers: Vec<(String, Bytes)>,
    body: Bytes,
) -> MutationRecord {
    let method = Method::from_bytes(old.request.method.as_bytes()).unwrap_or(Method::POST);
    let mut record = old.clone();
    record.key = new_key.to_string();
    record.fingerprint = crate::outbox::fingerprint(&method, &old.request.path_and_query, &body);
    record.seq = 0;
    // A new acceptance: `queue.max_age` counts from the operator's edit.
    record.accepted_at_ms = now_ms();
    record.status = MutationStatus::Queued;
    record.attempts = 0;
    record.next_attempt_at_ms = 0;
    record.request.headers = headers;
    record.request.body = body;
    record.outcome = None;
    record.response = None;
    record.finished_at_ms = None;
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(json: serde_json::Value) -> Edit {
        serde_json::from_value(json).expect("edit")
    }

    #[test]
    fn headers_are_set_removed_and_marked() {
        let stored = vec![
            (
                "content-type".to_string(),
                Bytes::from_static(b"text/plain"),
            ),
            ("x-old".to_string(), Bytes::from_static(b"1")),
            (EDITED_FROM.to_string(), Bytes::from_static(b"earlier")),
        ];
        let e = edit(
            serde_json::json!({"headers": {"X-Old": null, "Content-Type": "application/json"}}),
        );
        let h = e.apply_headers(&stored, "k").expect("applied");
        assert_eq!(
            h,
            vec![
                (
                    "content-type".to_string(),
                    Bytes::from_static(b"application/json")
                ),
                (EDITED_FROM.to_string(), Bytes::from_static(b"k")),
            ]
        );
        for name in ["Idempotency-Key", "content-length", "Host", "bad name"] {
            let e = edit(serde_json::json!({"headers": {name: "x"}}));
            assert!(e.apply_headers(&stored, "k").is_err(), "{name}");
        }
    }

    #[test]
    fn a_json_string_body_is_sent_as_its_text_and_other_values_serialised() {
        assert_eq!(
            edit(serde_json::json!({"body": "a=1"})).body_bytes(),
            Some(Bytes::from_static(b"a=1"))
        );
        assert_eq!(
            edit(serde_json::json!({"body": {"qty": 1}})).body_bytes(),
            Some(Bytes::from_static(b"{\"qty\":1}"))
        );
        assert!(edit(serde_json::json!({})).is_empty());
        assert!(serde_json::from_value::<Edit>(serde_json::json!({"bdy": 1})).is_err());
    }
}
