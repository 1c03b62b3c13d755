//! Classification of an upstream answer to a replayed mutation.
//!
//! The result is a value, [`Outcome`], decided here and matched exhaustively where it is
//! acted on (`replay.rs`). Defaults follow the contract; routes override the status sets and
//! add JSON-pointer checks on 2xx bodies (`[route.classify]`).

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode, header};

use crate::config::{ClassifyConfig, RuleClass};
use crate::store::MutationStatus;

/// What to do with a replayed mutation after the upstream's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied: done.
    Success,
    /// Applied with errors: done, recorded.
    Partial,
    /// The upstream refused it: dead-letter.
    Validation,
    /// It conflicts with the upstream's state: dead-letter.
    Conflict,
    /// The credentials it carries were refused: wait for fresh ones.
    AuthRequired,
    /// Try again later (not before `after`, when the upstream said so).
    Retryable {
        /// The upstream's `Retry-After`.
        after: Option<Duration>,
    },
}

impl Outcome {
    /// The status a mutation ends in with this outcome; `None` while it must wait or retry.
    pub fn final_status(&self) -> Option<MutationStatus> {
        match self {
            Outcome::Success => Some(MutationStatus::Succeeded),
            Outcome::Partial => Some(MutationStatus::Partial),
            Outcome::Validation => Some(MutationStatus::Rejected),
            Outcome::Conflict => Some(MutationStatus::Conflict),
            Outcome::AuthRequired | Outcome::Retryable { .. } => None,
        }
    }

    /// The class name used in events, logs and the status document.
    pub fn class(&self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Partial => "partial",
            Outcome::Validation => "validation",
            Outcome::Conflict => "conflict",
            Outcome::AuthRequired => "auth_required",
            Outcome::Retryable { .. } => "retryable",
        }
    }
}

/// Classify an answer: status, headers, and the (possibly truncated) body.
pub fn classify(
    rules: &ClassifyConfig,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Outcome {
    let code = status.as_u16();
    if rules.retryable.contains(&code) {
        return Outcome::Retryable {
            after: retry_after(headers),
        };
    }
    if rules.auth_required.contains(&code) {
        return Outcome::AuthRequired;
    }
    if rules.conflict.contains(&code) {
        return Outcome::Conflict;
    }
    if rules.partial.contains(&code) {
        return Outcome::Partial;
    }
    if rules.validation.contains(&code) {
        return Outcome::Validation;
    }
    if status.is_success() {
        return classify_body(rules, body);
    }
    if status.is_redirection() {
        return Outcome::Success;
    }
    if status.is_client_error() {
        return Outcome::Validation;
    }
    // Other 5xx (and 1xx) are taken as transient.
    Outcome::Retryable {
        after: retry_after(headers),
    }
}

/// Whether an answer with `status` leaves a mutation to be tried again (retryable, or waiting
/// for fresh credentials), whatever its body says: such an answer is not the idempotency
/// key's final one.
pub fn is_transient(rules: &ClassifyConfig, status: StatusCode) -> bool {
    matches!(
        classify(rules, status, &HeaderMap::new(), b""),
        Outcome::Retryable { .. } | Outcome::AuthRequired
    )
}

/// 2xx: the route's body rules first, then the GraphQL-style `errors` convention.
fn classify_body(rules: &ClassifyConfig, body: &[u8]) -> Outcome {
    // No body, no JSON (and no error value to build: reads and `is_transient` pass none).
    if body.is_empty() {
        return Outcome::Success;
    }
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Outcome::Success;
    };
    for rule in &rules.body {
        let value = json.pointer(&rule.pointer);
        let matched = match (&rule.equals, value) {
            (Some(expected), Some(v)) => v == expected,
            (Some(_), None) => false,
            (None, v) => rule.non_empty && v.is_some_and(non_empty),
        };
        if matched {
            return match rule.class {
                RuleClass::Success => Outcome::Success,
                RuleClass::Partial => Outcome::Partial,
                RuleClass::Validation => Outcome::Validation,
                RuleClass::Conflict => Outcome::Conflict,
                RuleClass::Retryable => Outcome::Retryable { after: None },
            };
        }
    }
    let has_errors = json
        .get("errors")
        .and_then(|e| e.as_array())
        .is_some_and(|a| !a.is_empty());
    if !has_errors {
        return Outcome::Success;
    }
    match json.get("data") {
        Some(d) if !d.is_null() => Outcome::Partial,
        _ => Outcome::Validation,
    }
}

fn non_empty(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null | serde_json::Value::Bool(false) => false,
        serde_json::Value::String(s) => !s.is_empty(),
        serde_json::Value::Array(a) => !a.is_empty(),
        serde_json::Value::Object(o) => !o.is_empty(),
        _ => true,
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BodyRule;

    fn c(status: u16, body: &str) -> Outcome {
        classify(
            &ClassifyConfig::default(),
            StatusCode::from_u16(status).expect("status"),
            &HeaderMap::new(),
            body.as_bytes(),
        )
    }

    #[test]
    fn default_table_matches_the_contract() {
        for s in [408, 425, 429, 500, 502, 503, 504] {
            assert_eq!(c(s, ""), Outcome::Retryable { after: None }, "{s}");
        }
        assert_eq!(c(200, "{}"), Outcome::Success);
        assert_eq!(c(201, "not json"), Outcome::Success);
        assert_eq!(c(204, ""), Outcome::Success);
        assert_eq!(c(302, ""), Outcome::Success);
        assert_eq!(c(207, ""), Outcome::Partial);
        assert_eq!(
            c(200, r#"{"errors":[{"m":"x"}],"data":{"a":1}}"#),
            Outcome::Partial
        );
        assert_eq!(c(200, r#"{"errors":[{"m":"x"}]}"#), Outcome::Validation);
        assert_eq!(
            c(200, r#"{"errors":[{"m":"x"}],"data":null}"#),
            Outcome::Validation
        );
        assert_eq!(c(200, r#"{"errors":[],"data":null}"#), Outcome::Success);
        assert_eq!(c(401, ""), Outcome::AuthRequired);
        assert_eq!(c(409, ""), Outcome::Conflict);
        assert_eq!(c(412, ""), Outcome::Conflict);
        for s in [400, 403, 404, 422, 501, 505] {
            assert_eq!(c(s, ""), Outcome::Validation, "{s}");
        }
    }

    #[test]
    fn transient_answers_are_retryable_or_auth_required() {
        let rules = ClassifyConfig::default();
        for s in [401, 408, 429, 503, 599] {
            let status = StatusCode::from_u16(s).expect("status");
            assert!(is_transient(&rules, status), "{s}");
        }
        for s in [200, 201, 207, 303, 400, 409, 422, 501] {
            let status = StatusCode::from_u16(s).expect("status");
            assert!(!is_transient(&rules, status), "{s}");
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, "7".parse().expect("value"));
        let out = classify(
            &ClassifyConfig::default(),
            StatusCode::TOO_MANY_REQUESTS,
            &h,
            b"",
        );
        assert_eq!(
            out,
            Outcome::Retryable {
                after: Some(Duration::from_secs(7))
            }
        );
        let later = SystemTime::now() + Duration::from_secs(120);
        h.insert(
            header::RETRY_AFTER,
            httpdate::fmt_http_date(later).parse().expect("value"),
        );
        let after = retry_after(&h).expect("date");
        assert!(after > Duration::from_secs(100) && after <= Duration::from_secs(120));
    }

    #[test]
    fn body_rules_come_first() {
        let rules = ClassifyConfig {
            body: vec![BodyRule {
                pointer: "/result/status".into(),
                equals: Some(serde_json::json!("rejected")),
                non_empty: false,
                class: RuleClass::Validation,
            }],
            ..ClassifyConfig::default()
        };
        let out = classify(
            &rules,
            StatusCode::OK,
            &HeaderMap::new(),
            br#"{"result":{"status":"rejected"}}"#,
        );
        assert_eq!(out, Outcome::Validation);
        let out = classify(
            &rules,
            StatusCode::OK,
            &HeaderMap::new(),
            br#"{"result":{"status":"ok"}}"#,
        );
        assert_eq!(out, Outcome::Success);
    }
}
