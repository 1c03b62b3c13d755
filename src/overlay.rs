//! Read your own writes: JSON reads on an `overlay = true` route reflect the caller's pending
//! mutations on it (issue #19 point 1).
//!
//! A route names its item URI template (`item = "/orders/{id}"`); the collection is the
//! template without its last segment (`/orders`). While a mutation is pending (queued, in
//! flight, or waiting for credentials), a read of
//! - the item: PUT replaces it, PATCH merges into it (RFC 7396), DELETE makes it `404`;
//! - the collection (a JSON array, or the array at `list_pointer`): POST adds the posted object,
//!   and item writes change, replace or remove the element whose `id_field` matches.
//!
//! Pending writes are applied in acceptance order over whatever the read path produced (the
//! upstream's answer or the cached copy). Once the upstream has applied a write it is no
//! longer pending, and the upstream's own answer is served unchanged. Only the caller's own
//! writes count (the identity hash recorded with each mutation), on `public` routes too.
//! Pending includes a forward answered `202` by the route's `write_timeout` that has not
//! settled yet (held by [`Activity`], not yet by the store).
//! Bodies that are not JSON, or shapes that do not match, pass unchanged.

use std::sync::Arc;

use http::Method;
use serde_json::{Map, Value};

use crate::activity::Activity;
use crate::context::Identity;
use crate::outbox::as_settled;
use crate::store::{MutationRecord, Store, StoreError};

/// Header on answers changed by pending writes: how many were applied.
pub const OUTPOST_PENDING: http::HeaderName = http::HeaderName::from_static("outpost-pending");

/// The most pending items of one partition looked at per read.
const PEEK_LIMIT: usize = 1000;

/// A route's overlay settings, compiled.
#[derive(Debug, Clone)]
pub struct OverlayShape {
    /// Segments of the item template; `None` is the id segment (`{id}`).
    item: Vec<Option<String>>,
    /// The field of an item that holds its id.
    pub id_field: String,
    /// JSON pointer of the array in a collection answer ("" = the root).
    pub list_pointer: String,
    /// Mark overlaid elements with `_outpost`.
    pub marker: bool,
}

/// What a path is, for a route's overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The collection (`/orders`).
    Collection,
    /// One item (`/orders/7` → `"7"`).
    Item(String),
}

/// One pending write as the overlay needs it.
#[derive(Debug, Clone)]
pub struct PendingWrite {
    /// Its idempotency key.
    pub key: String,
    /// Its method.
    pub method: Method,
    /// What it writes to.
    pub target: Target,
    /// Its body, if JSON.
    pub body: Option<Value>,
}

/// The result of overlaying pending writes on an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Overlaid {
    /// The item is deleted by a pending write: answer 404.
    Deleted,
    /// The body changed.
    Changed(Value),
    /// Nothing matched the shape: pass the answer unchanged.
    Unchanged,
}

impl OverlayShape {
    /// Compile an item template (`/orders/{id}`); the last segment must be a `{…}` placeholder.
    pub fn new(
        item: &str,
        id_field: Option<&str>,
        list_pointer: Option<&str>,
        marker: bool,
    ) -> Result<Self, String> {
        if !item.starts_with('/') {
            return Err("must start with '/'".into());
        }
        let segments: Vec<Option<String>> = item
            .trim_start_matches('/')
            .split('/')
            .map(|s| {
                if s.starts_with('{') && s.ends_with('}') {
                    None
                } else {
                    Some(s.to_string())
                }
            })
            .collect();
        if segments.len() < 2 || segments.last().is_some_and(Option::is_some) {
            return Err(format!(
                "{item:?}: the last segment must be the id placeholder, after at least one \
                 segment naming the collection, e.g. \"/orders/{{id}}\""
            ));
        }
        let list_pointer = list_pointer.unwrap_or("").to_string();
        if !list_pointer.is_empty() && !list_pointer.starts_with('/') {
            return Err(format!(
                "list_pointer {list_pointer:?} is not a JSON pointer (empty, or starting with '/')"
            ));
        }
        Ok(Self {
            item: segments,
            id_field: id_field.unwrap_or("id").to_string(),
            list_pointer,
            marker,
        })
    }

    /// A sample item path and the collection path (for checking the route matches them).
    pub fn sample_paths(&self) -> (String, String) {
        let seg = |s: &Option<String>| s.clone().unwrap_or_else(|| "1".into());
        let all: Vec<String> = self.item.iter().map(seg).collect();
        let item = format!("/{}", all.join("/"));
        let collection = format!("/{}", all[..all.len() - 1].join("/"));
        (item, collection)
    }

    /// What `path_and_query` (its query ignored) is for this shape, if anything. Placeholders
    /// other than the last match any one segment.
    pub fn target(&self, path_and_query: &str) -> Option<Target> {
        let path = path_and_query.split(['?', '#']).next().unwrap_or("");
        let path = path.trim_end_matches('/');
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let collection_len = self.item.len() - 1;
        let prefix_matches = |n: usize| {
            segments.len() >= n
                && self.item[..n]
                    .iter()
                    .zip(&segments)
                    .all(|(t, s)| t.as_deref().is_none_or(|t| t == *s))
        };
        if segments.len() == collection_len && prefix_matches(collection_len) {
            return Some(Target::Collection);
        }
        if segments.len() == self.item.len() && prefix_matches(collection_len) {
            let id = percent_encoding::percent_decode_str(segments[collection_len])
                .decode_utf8_lossy()
                .into_owned();
            return Some(Target::Item(id));
        }
        None
    }

    /// The collection path of an item path (for matching writes of one collection only).
    fn collection_of(path_and_query: &str) -> &str {
        let path = path_and_query.split(['?', '#']).next().unwrap_or("");
        let path = path.trim_end_matches('/');
        path.rsplit_once('/').map_or("", |(c, _)| c)
    }

    /// Apply `writes` (oldest first) to the answer `body` of a read of `target`. `body` is
    /// `None` when there was no answer to start from (nothing cached, or a 404).
    pub fn apply(&self, target: &Target, body: Option<Value>, writes: &[PendingWrite]) -> Overlaid {
        match target {
            Target::Item(id) => self.apply_item(id, body, writes),
            Target::Collection => match body {
                Some(body) => self.apply_collection(body, writes),
                None => Overlaid::Unchanged,
            },
        }
    }

    fn apply_item(&self, id: &str, body: Option<Value>, writes: &[PendingWrite]) -> Overlaid {
        let mut current = body;
        let mut changed = false;
        for w in writes {
            if !self.concerns(&Target::Item(id.to_string()), w) {
                continue;
            }
            match (&w.method, &w.body) {
                // A POST to the collection that sent the item's id created it.
                (&Method::POST, Some(new)) => current = Some(self.marked(new.clone(), &w.key)),
                (&Method::DELETE, _) => current = None,
                (&Method::PUT, Some(new)) => current = Some(self.marked(new.clone(), &w.key)),
                (&Method::PATCH, Some(patch)) => {
                    let Some(mut doc) = current.take() else {
                        continue;
                    };
                    merge_patch(&mut doc, patch);
                    current = Some(self.marked(doc, &w.key));
                }
                _ => continue,
            }
            changed = true;
        }
        match (changed, current) {
            (false, _) => Overlaid::Unchanged,
            (true, None) => Overlaid::Deleted,
            (true, Some(v)) => Overlaid::Changed(v),
        }
    }

    fn apply_collection(&self, mut body: Value, writes: &[PendingWrite]) -> Overlaid {
        let Some(list) = body
            .pointer_mut(&self.list_pointer)
            .and_then(Value::as_array_mut)
        else {
            return Overlaid::Unchanged;
        };
        let mut changed = false;
        for w in writes {
            match (&w.target, &w.method, &w.body) {
                (Target::Collection, &Method::POST, Some(new)) if new.is_object() => {
                    list.push(self.marked(new.clone(), &w.key));
                }
                (Target::Item(id), method, patch) => {
                    let at = list.iter().position(|e| self.has_id(e, id));
                    match (method, at, patch) {
                        (&Method::DELETE, Some(i), _) => {
                            list.remove(i);
                        }
                        (&Method::PUT, Some(i), Some(new)) => {
                            list[i] = self.marked(new.clone(), &w.key);
                        }
                        (&Method::PUT, None, Some(new)) if new.is_object() => {
                            list.push(self.marked(new.clone(), &w.key));
                        }
                        (&Method::PATCH, Some(i), Some(patch)) => {
                            merge_patch(&mut list[i], patch);
                            let doc = list[i].take();
                            list[i] = self.marked(doc, &w.key);
                        }
                        _ => continue,
                    }
                }
                _ => continue,
            }
            changed = true;
        }
        if changed {
            Overlaid::Changed(body)
        } else {
            Overlaid::Unchanged
        }
    }

    /// Whether pending write `w` changes what a read of `target` answers: every write of the
    /// collection for a collection read; for an item, its own writes and a POST to the
    /// collection that sent its id.
    pub fn concerns(&self, target: &Target, w: &PendingWrite) -> bool {
        match target {
            Target::Collection => true,
            Target::Item(id) => {
                w.target == *target
                    || (w.method == Method::POST
                        && w.target == Target::Collection
                        && w.body.as_ref().is_some_and(|b| self.has_id(b, id)))
            }
        }
    }

    /// Whether element `e` has the id `id` (strings and numbers compare by their text).
    fn has_id(&self, e: &Value, id: &str) -> bool {
        match e.get(&self.id_field) {
            Some(Value::String(s)) => s == id,
            Some(Value::Number(n)) => n.to_string() == id,
            _ => false,
        }
    }

    fn marked(&self, mut v: Value, key: &str) -> Value {
        if self.marker
            && let Some(map) = v.as_object_mut()
        {
            let mut m = Map::new();
            m.insert("pending".into(), Value::Bool(true));
            m.insert("key".into(), Value::String(key.to_string()));
            map.insert("_outpost".into(), Value::Object(m));
        }
        v
    }

    /// The pending writes of a queued record, if it is one this shape overlays for
    /// `collection` (the collection path of the read).
    fn pending_write(&self, record: &MutationRecord, collection: &str) -> Option<PendingWrite> {
        let method = Method::from_bytes(record.request.method.as_bytes()).ok()?;
        let target = self.target(&record.request.path_and_query)?;
        let its_collection = match &target {
            Target::Collection => record
                .request
                .path_and_query
                .split(['?', '#'])
                .next()
                .unwrap_or("")
                .trim_end_matches('/'),
            Target::Item(_) => Self::collection_of(&record.request.path_and_query),
        };
        if its_collection != collection {
            return None;
        }
        let body = serde_json::from_slice(&record.request.body).ok();
        Some(PendingWrite {
            key: record.key.clone(),
            method,
            target,
            body,
        })
    }

    /// The collection path a read of `path_and_query` belongs to.
    pub fn collection_path(&self, path_and_query: &str, target: &Target) -> String {
        match target {
            Target::Collection => path_and_query
                .split(['?', '#'])
                .next()
                .unwrap_or("")
                .trim_end_matches('/')
                .to_string(),
            Target::Item(_) => Self::collection_of(path_and_query).to_string(),
        }
    }
}

/// RFC 7396 JSON merge patch: apply `patch` to `target` in place.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(map) = target {
        for (k, v) in patch {
            if v.is_null() {
                map.remove(k);
            } else {
                merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Finds the pending writes of a caller on a route in the store (and among the forwards
/// still settling after a `write_timeout` 202).
pub struct PendingWrites {
    store: Arc<dyn Store>,
    activity: Arc<Activity>,
}

impl PendingWrites {
    /// Pending writes as `store` and `activity` hold them.
    pub fn new(store: Arc<dyn Store>, activity: Arc<Activity>) -> Self {
        Self { store, activity }
    }

    /// The pending writes, oldest first, of `identity` (`None`: anyone's)
    /// that `shape` overlays on reads of `collection`.
    pub async fn for_read(
        &self,
        shape: &OverlayShape,
        collection: &str,
        identity: Option<&Identity>,
    ) -> Result<Vec<PendingWrite>, StoreError> {
        let mine = |r: &MutationRecord| identity.is_none_or(|i| r.identity == Some(i.0));
        // Settling forwards came before anything queued behind them (a partition with queued
        // items queues new mutations instead of forwarding them).
        let mut records: Vec<MutationRecord> =
            self.activity.settling().into_iter().filter(mine).collect();
        let settling = records.len();
        for partition in self.store.pending_partitions().await? {
            for record in self.store.peek(&partition, PEEK_LIMIT).await? {
                let record = as_settled(&*self.store, &self.activity, record).await;
                if !record.status.is_pending() {
                    continue;
                }
                if let Some(identity) = identity
                    && record.identity != Some(identity.0)
                {
                    continue;
                }
                // Queued just now after its forward failed, and not yet let go as settling.
                if records[..settling].iter().any(|r| r.key == record.key) {
                    continue;
                }
                records.push(record);
            }
        }
        records[settling..].sort_by_key(|r| r.seq);
        Ok(records
            .iter()
            .filter_map(|r| shape.pending_write(r, collection))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shape(marker: bool) -> OverlayShape {
        OverlayShape::new("/orders/{id}", None, None, marker).expect("shape")
    }

    fn write(key: &str, method: Method, target: Target, body: Option<Value>) -> PendingWrite {
        PendingWrite {
            key: key.into(),
            method,
            target,
            body,
        }
    }

    /// The examples of RFC 7396 appendix A.
    #[test]
    fn merge_patch_follows_rfc_7396_examples() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (mut target, patch, expected) in cases {
            merge_patch(&mut target, &patch);
            assert_eq!(target, expected, "patch {patch}");
        }
    }

    #[test]
    fn targets_follow_the_item_template() {
        let s = shape(false);
        assert_eq!(s.target("/orders"), Some(Target::Collection));
        assert_eq!(s.target("/orders/?page=2"), Some(Target::Collection));
        assert_eq!(s.target("/orders/7"), Some(Target::Item("7".into())));
        assert_eq!(
            s.target("/orders/a%20b?x"),
            Some(Target::Item("a b".into()))
        );
        assert_eq!(s.target("/orders/7/lines"), None);
        assert_eq!(s.target("/other/7"), None);
        let nested = OverlayShape::new("/shops/{shop}/orders/{id}", None, None, false).expect("ok");
        assert_eq!(nested.target("/shops/3/orders"), Some(Target::Collection));
        assert_eq!(
            nested.target("/shops/3/orders/9"),
            Some(Target::Item("9".into()))
        );
        assert!(OverlayShape::new("/orders", None, None, false).is_err());
        assert!(OverlayShape::new("/orders/{id}/x", None, None, false).is_err());
        assert!(OverlayShape::new("/orders/{id}", None, Some("items"), false).is_err());
    }

    #[test]
    fn item_writes_replace_merge_and_delete() {
        let s = shape(false);
        let item = Target::Item("7".into());
        let base = Some(json!({"id": 7, "qty": 1, "note": "x"}));
        let patch = write(
            "k1",
            Method::PATCH,
            item.clone(),
            Some(json!({"qty": 2, "note": null})),
        );
        assert_eq!(
            s.apply(&item, base.clone(), std::slice::from_ref(&patch)),
            Overlaid::Changed(json!({"id": 7, "qty": 2}))
        );
        let put = write(
            "k2",
            Method::PUT,
            item.clone(),
            Some(json!({"id": 7, "qty": 9})),
        );
        assert_eq!(
            s.apply(&item, None, &[put.clone(), patch.clone()]),
            Overlaid::Changed(json!({"id": 7, "qty": 2}))
        );
        let del = write("k3", Method::DELETE, item.clone(), None);
        assert_eq!(
            s.apply(&item, base.clone(), &[patch, del]),
            Overlaid::Deleted
        );
        let posted = write(
            "k5",
            Method::POST,
            Target::Collection,
            Some(json!({"id": 7, "qty": 4})),
        );
        assert!(s.concerns(&item, &posted));
        assert_eq!(
            s.apply(&item, None, std::slice::from_ref(&posted)),
            Overlaid::Changed(json!({"id": 7, "qty": 4})),
            "a POST that sent the item's id created it"
        );
        let other = write("k4", Method::DELETE, Target::Item("8".into()), None);
        assert!(!s.concerns(&item, &other));
        assert_eq!(s.apply(&item, base, &[other]), Overlaid::Unchanged);
    }

    #[test]
    fn collection_reflects_posts_and_item_writes_by_id_field() {
        let s = OverlayShape::new("/orders/{id}", Some("oid"), Some("/data/items"), true)
            .expect("shape");
        let base = json!({"data": {"items": [{"oid": 1, "qty": 1}, {"oid": "2", "qty": 2}]}});
        let writes = [
            write(
                "p",
                Method::POST,
                Target::Collection,
                Some(json!({"qty": 3})),
            ),
            write(
                "m",
                Method::PATCH,
                Target::Item("1".into()),
                Some(json!({"qty": 5})),
            ),
            write("d", Method::DELETE, Target::Item("2".into()), None),
        ];
        let marker = |k: &str| json!({"pending": true, "key": k});
        assert_eq!(
            s.apply(&Target::Collection, Some(base), &writes),
            Overlaid::Changed(json!({"data": {"items": [
                {"oid": 1, "qty": 5, "_outpost": marker("m")},
                {"qty": 3, "_outpost": marker("p")},
            ]}}))
        );
        assert_eq!(
            s.apply(&Target::Collection, Some(json!({"not": "a list"})), &writes),
            Overlaid::Unchanged,
            "a shape that does not match passes unchanged"
        );
    }
}
