//! The mutation status documents: `GET /_outpost/mutations/{key}` on the proxy listener (only
//! for the caller that sent the key) and the documents the admin API lists (for the operator).
//!
//! A document is made from the stored record and the replayer's [`Activity`] (an item being
//! sent right now is reported `in_flight`, which the store does not record).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::header::{HeaderMap, HeaderName};
use http::{Method, Response, StatusCode};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use crate::activity::Activity;
use crate::admin::stream::EventFilter;
use crate::body::ProxyBody;
use crate::context::Identity;
use crate::error::{ProxyError, json_response};
use crate::events::Event;
use crate::outbox::as_settled;
use crate::store::{MutationRecord, MutationStatus, Store, rfc3339_ms};

const KEY_IN_PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The most pending items of one partition `GET /_outpost/mutations` looks at.
const LIST_LIMIT: usize = 1000;

/// Status documents of mutations.
pub struct MutationDocs {
    store: Arc<dyn Store>,
    activity: Arc<Activity>,
    prefix: String,
    identity_headers: Vec<HeaderName>,
}

impl MutationDocs {
    /// Documents of `store`'s records under the reserved `prefix`; callers are told apart by
    /// `identity_headers` (`cache.identity_headers`).
    pub fn new(
        store: Arc<dyn Store>,
        activity: Arc<Activity>,
        prefix: &str,
        identity_headers: Vec<HeaderName>,
    ) -> Self {
        Self {
            store,
            activity,
            prefix: prefix.to_string(),
            identity_headers,
        }
    }

    /// The identity a mutation's key belongs to.
    pub fn owner(&self, headers: &HeaderMap) -> Identity {
        Identity::from_headers(headers, &self.identity_headers)
    }

    /// Where the status document of `key` is (`Location` of a 202).
    pub fn location(&self, key: &str) -> String {
        format!(
            "{}mutations/{}",
            self.prefix,
            utf8_percent_encode(key, KEY_IN_PATH)
        )
    }

    /// Answer a request under the reserved prefix.
    pub async fn answer(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Response<ProxyBody> {
        let rest = &path[self.prefix.len().min(path.len())..];
        if rest == "mutations" || rest == "mutations/" {
            return self.list_pending(method, headers).await;
        }
        let Some(encoded) = rest.strip_prefix("mutations/") else {
            return ProxyError::NotFound.into_response();
        };
        if method != Method::GET && method != Method::HEAD {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &serde_json::json!({"error": "method_not_allowed"}),
            );
        }
        let key = percent_decode_str(encoded).decode_utf8_lossy().to_string();
        let caller = self.owner(headers);
        let found = match self.store.mutation(&key).await {
            Ok(None) => Ok(self.activity.settling_record(&key)),
            Ok(Some(record)) => Ok(Some(as_settled(&*self.store, &self.activity, record).await)),
            other => other,
        };
        match found {
            // Only the caller that sent it sees it (the operator sees all on the admin API).
            Ok(Some(record)) if record.identity == Some(caller.0) => {
                json_response(StatusCode::OK, &self.document(&record))
            }
            Ok(_) => ProxyError::NotFound.into_response(),
            Err(e) => ProxyError::NotStored(e).into_response(),
        }
    }

    /// `GET /_outpost/mutations`: the caller's own pending mutations, oldest first, as
    /// `{"mutations": [document + "method", "path"]}`: forwards still settling after a
    /// `write_timeout` 202 (`in_flight`), then the queued ones.
    async fn list_pending(&self, method: &Method, headers: &HeaderMap) -> Response<ProxyBody> {
        if method != Method::GET && method != Method::HEAD {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &serde_json::json!({"error": "method_not_allowed"}),
            );
        }
        let caller = self.owner(headers);
        let mut records: Vec<MutationRecord> = self
            .activity
            .settling()
            .into_iter()
            .filter(|r| r.identity == Some(caller.0))
            .collect();
        let settling = records.len();
        let partitions = match self.store.pending_partitions().await {
            Ok(p) => p,
            Err(e) => return ProxyError::NotStored(e).into_response(),
        };
        for partition in partitions {
            match self.store.peek(&partition, LIST_LIMIT).await {
                Ok(found) => {
                    for r in found {
                        let r = as_settled(&*self.store, &self.activity, r).await;
                        let listed = records[..settling].iter().any(|s| s.key == r.key);
                        if r.status.is_pending() && r.identity == Some(caller.0) && !listed {
                            records.push(r);
                        }
                    }
                }
                Err(e) => return ProxyError::NotStored(e).into_response(),
            }
        }
        records[settling..].sort_by_key(|r| r.seq);
        let list: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                let mut doc = self.document(r);
                if let Some(map) = doc.as_object_mut() {
                    map.insert("method".into(), r.request.method.clone().into());
                    map.insert("path".into(), r.request.path_and_query.clone().into());
                }
                doc
            })
            .collect();
        json_response(StatusCode::OK, &serde_json::json!({ "mutations": list }))
    }

    /// The filter of the app-facing event stream (`GET /_outpost/events`): online and offline,
    /// and the events of the caller's own mutations (looked up by key, once per key).
    pub fn event_filter(&self, headers: &HeaderMap) -> EventFilter {
        let owner = self.owner(headers);
        let store = self.store.clone();
        let activity = self.activity.clone();
        let known: Arc<Mutex<HashMap<String, bool>>> = Arc::default();
        Arc::new(move |event: &Event| {
            let key = match event {
                Event::Online | Event::Offline { .. } => return Box::pin(async { true }),
                Event::Paused | Event::Resumed => return Box::pin(async { false }),
                Event::Queued { key, .. }
                | Event::ReplayAttempt { key, .. }
                | Event::Classified { key, .. }
                | Event::DeadLettered { key, .. }
                | Event::Conflict { key, .. }
                | Event::Coalesced { key, .. }
                | Event::AuthRequired { key, .. }
                | Event::Expired { key }
                | Event::Operator { key, .. } => key.clone(),
            };
            let store = store.clone();
            let known = known.clone();
            let activity = activity.clone();
            Box::pin(async move {
                let cached = known.lock().ok().and_then(|k| k.get(&key).copied());
                if let Some(mine) = cached {
                    return mine;
                }
                let record = match store.mutation(&key).await {
                    Ok(None) => activity.settling_record(&key),
                    found => found.ok().flatten(),
                };
                let mine = record.is_some_and(|r| r.identity == Some(owner.0));
                if let Ok(mut k) = known.lock() {
                    // Bounded: a long-lived stream forgets what it learnt rather than grow.
                    if k.len() >= 4096 {
                        k.clear();
                    }
                    k.insert(key, mine);
                }
                mine
            })
        })
    }

    /// The JSON status document of a mutation.
    pub fn document(&self, record: &MutationRecord) -> serde_json::Value {
        let status = if self.activity.is_in_flight(&record.key) {
            MutationStatus::InFlight
        } else {
            record.status
        };
        let upstream_body = record.response.as_ref().map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&r.body).into())
            })
        });
        // An operator's edit (admin `POST /dead-letters/{key}/retry` with a body).
        let edited_from = record
            .request
            .headers
            .iter()
            .find(|(n, _)| n == crate::admin::edit::EDITED_FROM)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
        let superseded_by = record
            .outcome
            .as_deref()
            .and_then(|o| o.strip_prefix(crate::store::SUPERSEDED_PREFIX));
        let mut doc = serde_json::json!({
            "idempotency_key": record.key,
            "status": status.as_str(),
            "attempts": record.attempts,
            "next_attempt_at": (status.is_pending() && record.next_attempt_at_ms > 0)
                .then(|| rfc3339_ms(record.next_attempt_at_ms)),
            "outcome": record.outcome,
            "upstream_status": record.response.as_ref().map(|r| r.status),
            "upstream_body": upstream_body,
            "partition": record.partition,
            "accepted_at": rfc3339_ms(record.accepted_at_ms),
        });
        if let Some(map) = doc.as_object_mut() {
            if let Some(from) = edited_from {
                map.insert("edited".into(), true.into());
                map.insert("edited_from".into(), from.into());
            }
            if let Some(into) = record.coalesced_into() {
                map.insert("coalesced_into".into(), into.into());
            }
            if let Some(to) = superseded_by {
                map.insert("edited".into(), true.into());
                map.insert("superseded_by".into(), to.into());
            }
        }
        doc
    }
}
