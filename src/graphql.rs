//! Reads with a body (issue #19 point 4): GraphQL over POST on `graphql = true` routes, and the
//! HTTP `QUERY` method everywhere.
//!
//! - A GraphQL request is a JSON body `{"query": "…", "operationName"?, "variables"?,
//!   "extensions"?}` or an `application/graphql` body holding the document itself. Its document
//!   is parsed with `graphql-parser`; the operation it runs is the one `operationName` names, or
//!   the only one. A `query` (the anonymous `{ … }` shorthand included) is a read, a `mutation`
//!   a write, a `subscription` passes through. A body that is not such a request (not JSON, no
//!   `query` string, a document that does not parse, several operations and no or an unknown
//!   `operationName`) is [`None`]: an ordinary POST.
//! - A read's cache key holds a [`digest`] of the *normalised* request: the document parsed and
//!   printed again (whitespace, commas and comments do not count), and every other member in
//!   canonical JSON (keys sorted; absent, `null` and `{}` variables are the same), so
//!   requests that differ only in layout share one cache entry.
//! - A `QUERY` request's key holds a digest of its `Content-Type` and its body as sent.

use graphql_parser::query::{Definition, Document, OperationDefinition};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The HTTP `QUERY` method (the safe method with a body, an IETF draft): always a read.
pub const QUERY_METHOD: &str = "QUERY";

/// What a GraphQL request's selected operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationKind {
    /// `query` (or the `{ … }` shorthand): a read.
    Query,
    /// `mutation`: a write.
    Mutation,
    /// `subscription`: passed through.
    Subscription,
}

/// A request body that is a GraphQL request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphqlRequest {
    /// What its selected operation does.
    pub kind: OperationKind,
    /// The normalised request (canonical JSON), the input of its cache key.
    pub normalized: String,
}

impl GraphqlRequest {
    /// The digest of the normalised request that goes into the cache key.
    pub fn digest(&self) -> [u8; 32] {
        digest(b"graphql", self.normalized.as_bytes())
    }
}

/// The GraphQL request `body` (with the request's `content_type`) holds, if it is one.
pub fn classify(content_type: Option<&str>, body: &[u8]) -> Option<GraphqlRequest> {
    let is_document = content_type.is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/graphql"))
    });
    let mut request = if is_document {
        let mut m = Map::new();
        m.insert(
            "query".into(),
            Value::String(std::str::from_utf8(body).ok()?.to_string()),
        );
        m
    } else {
        match serde_json::from_slice::<Value>(body).ok()? {
            Value::Object(m) => m,
            _ => return None,
        }
    };
    let text = request.get("query")?.as_str()?;
    let document = graphql_parser::parse_query::<&str>(text).ok()?;
    let name = match request.get("operationName") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return None,
    };
    let kind = selected(&document, name)?;
    let printed = document.to_string();
    request.insert("query".into(), Value::String(printed));
    for optional in ["operationName", "variables", "extensions"] {
        let empty = match request.get(optional) {
            Some(Value::Null) => true,
            Some(Value::Object(m)) => m.is_empty(),
            _ => false,
        };
        if empty {
            request.remove(optional);
        }
    }
    let normalized = canonical(Value::Object(request)).to_string();
    Some(GraphqlRequest { kind, normalized })
}

/// The kind of the operation a request runs: the one named `name`, else the only one.
fn selected<'a>(document: &Document<'a, &'a str>, name: Option<&str>) -> Option<OperationKind> {
    let mut operations = document.definitions.iter().filter_map(|d| match d {
        Definition::Operation(op) => Some(op),
        Definition::Fragment(_) => None,
    });
    let op = match name {
        Some(name) => operations.find(|op| operation_name(op) == Some(name))?,
        None => {
            let first = operations.next()?;
            if operations.next().is_some() {
                return None;
            }
            first
        }
    };
    Some(match op {
        OperationDefinition::SelectionSet(_) | OperationDefinition::Query(_) => {
            OperationKind::Query
        }
        OperationDefinition::Mutation(_) => OperationKind::Mutation,
        OperationDefinition::Subscription(_) => OperationKind::Subscription,
    })
}

fn operation_name<'a>(op: &OperationDefinition<'a, &'a str>) -> Option<&'a str> {
    match op {
        OperationDefinition::SelectionSet(_) => None,
        OperationDefinition::Query(q) => q.name,
        OperationDefinition::Mutation(m) => m.name,
        OperationDefinition::Subscription(s) => s.name,
    }
}

/// `value` with every object's keys in sorted order (whatever `serde_json`'s map keeps).
fn canonical(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, canonical(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}

/// The digest of a `QUERY` request's body: its media type and bytes.
pub fn query_method_digest(content_type: Option<&str>, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(content_type.unwrap_or("").trim().as_bytes());
    h.update(b"\0");
    h.update(body);
    digest(b"query-method", &h.finalize())
}

fn digest(kind: &[u8], bytes: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(kind);
    h.update(b"\0");
    h.update(bytes);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn json_body(v: Value) -> Option<GraphqlRequest> {
        classify(Some("application/json"), v.to_string().as_bytes())
    }

    #[test]
    fn the_selected_operation_decides_read_or_write() {
        let kind = |v: Value| json_body(v).map(|r| r.kind);
        assert_eq!(
            kind(json!({"query": "{ orders { id } }"})),
            Some(OperationKind::Query)
        );
        assert_eq!(
            kind(
                json!({"query": "query Q($id: ID!) { order(id: $id) { id } }", "variables": {"id": 1}})
            ),
            Some(OperationKind::Query)
        );
        assert_eq!(
            kind(json!({"query": "mutation { add(qty: 1) { id } }"})),
            Some(OperationKind::Mutation)
        );
        assert_eq!(
            kind(json!({"query": "subscription { changed { id } }"})),
            Some(OperationKind::Subscription)
        );
        let two = "query A { a } mutation B { b }";
        assert_eq!(
            kind(json!({"query": two, "operationName": "B"})),
            Some(OperationKind::Mutation)
        );
        assert_eq!(
            kind(json!({"query": two, "operationName": "A"})),
            Some(OperationKind::Query)
        );
        assert_eq!(kind(json!({"query": two})), None, "which one?");
        assert_eq!(kind(json!({"query": two, "operationName": "C"})), None);
        assert_eq!(kind(json!({"query": "{ unclosed"})), None);
        assert_eq!(kind(json!({"query": 7})), None);
        assert_eq!(kind(json!({"id": 7})), None);
        assert_eq!(
            kind(json!([{"query": "{ a }"}])),
            None,
            "batches are writes"
        );
        assert_eq!(classify(None, b"not json"), None);
        assert_eq!(
            classify(Some("application/graphql; charset=utf-8"), b"{ a }").map(|r| r.kind),
            Some(OperationKind::Query)
        );
        let deep = format!("{}{}", "{ a ".repeat(200), "}".repeat(200));
        assert_eq!(
            kind(json!({ "query": deep })),
            None,
            "over the nesting limit"
        );
    }

    #[test]
    fn layout_does_not_change_the_key_and_variables_do() {
        let a = json_body(json!({
            "query": "query Order($id: ID!) { order(id: $id) { id qty } }",
            "variables": {"id": "1", "x": {"b": 1, "a": 2}},
            "operationName": "Order",
        }))
        .expect("a");
        let b = classify(
            Some("application/json"),
            br##"{"operationName":"Order","variables":{"x":{"a":2,"b":1},"id":"1"},
                "query":"# the order\nquery   Order( $id :ID! ){\n  order(id:$id){ id, qty }\n}\n"}"##,
        )
        .expect("b");
        assert_eq!(a.normalized, b.normalized);
        assert_eq!(a.digest(), b.digest());
        let other = json_body(json!({
            "query": "query Order($id: ID!) { order(id: $id) { id qty } }",
            "variables": {"id": "2", "x": {"b": 1, "a": 2}},
            "operationName": "Order",
        }))
        .expect("other");
        assert_ne!(a.digest(), other.digest());
        let bare = json_body(json!({"query": "{ a }"})).expect("bare");
        let nulls = json_body(json!({"query": "{a}", "variables": null, "operationName": null}))
            .expect("n");
        let empty = json_body(json!({"query": "{ a }", "variables": {}})).expect("e");
        let doc = classify(Some("application/graphql"), b"{\n  a\n}").expect("doc");
        assert_eq!(bare.digest(), nulls.digest());
        assert_eq!(bare.digest(), empty.digest());
        assert_eq!(bare.digest(), doc.digest());
    }

    #[test]
    fn query_method_keys_hold_the_media_type_and_the_body() {
        let a = query_method_digest(Some("application/json"), b"{\"q\":1}");
        assert_eq!(
            a,
            query_method_digest(Some("application/json"), b"{\"q\":1}")
        );
        assert_ne!(
            a,
            query_method_digest(Some("application/json"), b"{\"q\":2}")
        );
        assert_ne!(a, query_method_digest(Some("text/plain"), b"{\"q\":1}"));
    }
}
