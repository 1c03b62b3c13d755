//! Property-based fuzzing of every parser that reads input outpost does not control (issue #21,
//! point 4): the config loader, the classification of upstream answers, the HAR loader,
//! idempotency keys, and the header values the cache and replay parse (`Cache-Control`,
//! `Expires`, `Age`, `Vary`, `Retry-After`). Each target must answer (an `Ok` or a clean error)
//! and never panic, whatever it is given; a few also check what the answer must be.
//!
//! Run at a bounded size in CI ([`CI_CASES`] per target); `OUTPOST_RELIABILITY_FULL=1` runs
//! [`FULL_CASES`]. Each target prints its executions as a `RELIABILITY` figure line.

use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};

use crate::config::ClassifyConfig;

/// Cases per target in CI.
const CI_CASES: u32 = 2_000;
/// Cases per target with `OUTPOST_RELIABILITY_FULL=1`.
const FULL_CASES: u32 = 200_000;

/// Run `test` on `cases()` values of `strategy` (panics are failures, shrunk by proptest), then
/// print the executions.
fn fuzz<S>(name: &str, strategy: S, test: impl Fn(S::Value))
where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let full = std::env::var("OUTPOST_RELIABILITY_FULL").is_ok_and(|v| v == "1");
    let cases = if full { FULL_CASES } else { CI_CASES };
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let executions = AtomicU64::new(0);
    let result = runner.run(&strategy, |value| {
        executions.fetch_add(1, Ordering::Relaxed);
        test(value);
        Ok(())
    });
    if let Err(e) = result {
        panic!("fuzz target {name}: {e}");
    }
    println!(
        "RELIABILITY {}",
        serde_json::json!({
            "section": "fuzz",
            "name": name,
            "executions": executions.load(Ordering::Relaxed),
        })
    );
}

/// Printable ASCII and a few troublemakers (quotes, brackets, control and non-ASCII chars).
fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::string::string_regex(&format!("[ -~]{{0,{max}}}")).expect("regex"),
        proptest::string::string_regex(&format!("[\"'\\[\\]{{}}=,.\\\\\n\t\0é€-]{{0,{max}}}"))
            .expect("regex"),
        any::<String>().prop_map(move |s| s.chars().take(max).collect()),
    ]
}

// ---------------------------------------------------------------------------------------------
// The config loader
// ---------------------------------------------------------------------------------------------

const SECTIONS: &[&str] = &[
    "[proxy]",
    "[upstream]",
    "[store]",
    "[cache]",
    "[queue]",
    "[replay]",
    "[replay.classify]",
    "[[replay.classify.body]]",
    "[admin]",
    "[[route]]",
    "[route.classify]",
    "[[warm]]",
    "[warm.headers]",
    "[nope]",
];

const KEYS: &[&str] = &[
    "accepted_at_field",
    "accepted_at_header",
    "allowed_hosts",
    "auth_principal",
    "auth_required",
    "backend",
    "backoff_multiplier",
    "body",
    "ca_file",
    "cache_ttl",
    "class",
    "concurrency",
    "conflict",
    "connect_timeout",
    "data_dir",
    "default_ttl",
    "disk_bytes",
    "enabled",
    "equals",
    "header_read_timeout",
    "headers",
    "id_field",
    "idempotency_retention",
    "identity_headers",
    "initial_backoff",
    "interval",
    "item",
    "list_pointer",
    "listen",
    "max_age",
    "max_attempts",
    "max_backoff",
    "max_body_bytes",
    "max_bytes",
    "max_connections",
    "max_depth",
    "max_entry_bytes",
    "max_header_bytes",
    "max_stale",
    "memory_bytes",
    "methods",
    "name",
    "network_timeout",
    "non_empty",
    "overlay",
    "page_cache_bytes",
    "partial",
    "partition",
    "path",
    "pointer",
    "probe_interval",
    "probe_interval_max",
    "probe_path",
    "progress_sync",
    "public",
    "rate_burst",
    "rate_limit",
    "read",
    "record_har",
    "redis_key_prefix",
    "redis_lease",
    "redis_min_replicas",
    "redis_sentinel_master",
    "redis_sentinels",
    "redis_url",
    "request_timeout",
    "reserved_prefix",
    "reset_threshold",
    "retryable",
    "shutdown_grace",
    "token",
    "url",
    "validation",
    "workers",
    "write",
    "write_timeout",
    "coalesce",
    "graphql",
    "conflict",
    "capture_version",
];

/// A TOML value of any type, with the odd ones that break naive code: huge and negative
/// numbers, NaN and infinities, durations of every shape, nested arrays and tables.
fn toml_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        Just("18446744073709551615".to_owned()),
        Just("-0".to_owned()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        Just("nan".to_owned()),
        Just("inf".to_owned()),
        Just("-inf".to_owned()),
        any::<bool>().prop_map(|b| b.to_string()),
        (
            any::<u64>(),
            prop::sample::select(vec!["ns", "ms", "s", "m", "h", "d", "y", "", "x"])
        )
            .prop_map(|(n, unit)| format!("\"{n}{unit}\"")),
        prop::sample::select(vec![
            "\"embedded\"",
            "\"redis\"",
            "\"network-first\"",
            "\"cache-first\"",
            "\"write-behind\"",
            "\"pass-through\"",
            "\"http://127.0.0.1:1\"",
            "\"redis://127.0.0.1:1/\"",
            "\"/orders/{id}\"",
            "\"/_outpost/\"",
            "\"jwt-sub\"",
            "\"header:X\"",
            "\"0.0.0.0:0\"",
            "\"[::1]:99999\"",
            "\"\"",
        ])
        .prop_map(str::to_owned),
        text(24).prop_map(|s| format!("{s:?}")),
        text(24).prop_map(|s| format!("'{s}'")),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec((prop::sample::select(KEYS.to_vec()), inner), 0..3).prop_map(
                |kv| {
                    let fields: Vec<String> =
                        kv.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                    format!("{{ {} }}", fields.join(", "))
                }
            ),
        ]
    })
}

/// A line of a config file: a section header, `key = value`, or garbage.
fn toml_line() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => prop::sample::select(SECTIONS.to_vec()).prop_map(str::to_owned),
        6 => (prop::sample::select(KEYS.to_vec()), toml_value())
            .prop_map(|(k, v)| format!("{k} = {v}")),
        1 => (text(12), toml_value()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => text(40),
    ]
}

#[test]
fn config_loader_answers_every_text_with_a_config_or_a_clean_error() {
    let texts = prop_oneof![
        3 => prop::collection::vec(toml_line(), 0..24).prop_map(|lines| lines.join("\n")),
        1 => any::<String>(),
    ];
    fuzz("config", texts, |text| {
        // The whole check `outpost check-config` runs: keys, values, routes.
        if let Err(e) = crate::route::parse(&text) {
            // A clean error says what is wrong.
            assert!(!e.to_string().is_empty());
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Classification of upstream answers
// ---------------------------------------------------------------------------------------------

/// Header values as an upstream may send them: any bytes a `HeaderValue` accepts.
fn header_value() -> impl Strategy<Value = HeaderValue> {
    prop_oneof![
        text(48),
        prop::collection::vec(prop_oneof![0x20u8..0x7f, 0x80u8..=0xff, Just(b'\t')], 0..48)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        prop::sample::select(vec![
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "Thu, 01 Jan 1970 00:00:00 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "max-age=99999999999999999999999",
            "max-age=-1, s-maxage=\"5\", private, no-cache=\"set-cookie\"",
            "no-store,,, ,max-age",
            "*",
            "accept-encoding, *, ",
        ])
        .prop_map(str::to_owned),
    ]
    .prop_map(|s| {
        // Keep the bytes as sent (a header value may hold obs-text); what no header value can
        // hold (control characters) is dropped rather than rejected, so runs never run dry.
        let bytes: Vec<u8> = s
            .bytes()
            .filter(|&b| b == b'\t' || b >= 0x20 && b != 0x7f)
            .collect();
        HeaderValue::from_bytes(&bytes).unwrap_or(HeaderValue::from_static("x"))
    })
}

/// A header map of the names the cache and replay read, with repeated and odd values.
fn header_map() -> impl Strategy<Value = HeaderMap> {
    let names = prop::sample::select(vec![
        "cache-control",
        "expires",
        "age",
        "vary",
        "retry-after",
        "set-cookie",
        "content-type",
        "etag",
        "x-other",
    ]);
    prop::collection::vec((names, header_value()), 0..8).prop_map(|pairs| {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(HeaderName::from_static(name), value);
        }
        map
    })
}

/// JSON bodies of every shape, GraphQL-style ones included, and bytes that are not JSON.
fn answer_body() -> impl Strategy<Value = Vec<u8>> {
    let json_leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        text(16).prop_map(serde_json::Value::from),
    ];
    let json = json_leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::vec(
                (
                    prop::sample::select(vec!["errors", "data", "status", "ok", "x"]),
                    inner
                ),
                0..4
            )
            .prop_map(|kv| {
                serde_json::Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    });
    prop_oneof![
        3 => json.prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => Just(b"{\"errors\":[{}],\"data\":null".to_vec()),
    ]
}

/// Classification rules as an operator may write them (status sets and JSON-pointer rules).
fn classify_rules() -> impl Strategy<Value = ClassifyConfig> {
    let codes = || prop::collection::vec(100u16..600, 0..4);
    let rule = (
        prop::sample::select(vec!["", "/errors", "/data/ok", "/a~1b", "/0", "/status"]),
        prop::option::of(answer_body()),
        any::<bool>(),
        prop::sample::select(vec![
            "success",
            "partial",
            "validation",
            "conflict",
            "retryable",
        ]),
    );
    (
        any::<bool>(),
        codes(),
        codes(),
        codes(),
        codes(),
        codes(),
        prop::collection::vec(rule, 0..3),
    )
        .prop_map(
            |(default, retryable, auth, conflict, partial, validation, rules)| {
                if default {
                    return ClassifyConfig::default();
                }
                let body = rules
                    .into_iter()
                    .filter_map(|(pointer, equals, non_empty, class)| {
                        let equals = match equals {
                            Some(b) => Some(serde_json::from_slice::<serde_json::Value>(&b).ok()?),
                            None => None,
                        };
                        serde_json::from_value::<crate::config::BodyRule>(serde_json::json!({
                            "pointer": pointer,
                            "equals": equals,
                            "non_empty": non_empty,
                            "class": class,
                        }))
                        .ok()
                    })
                    .collect();
                ClassifyConfig {
                    retryable,
                    auth_required: auth,
                    conflict,
                    partial,
                    validation,
                    body,
                }
            },
        )
}

#[test]
fn classification_answers_every_upstream_answer_and_keeps_the_contracts_defaults() {
    let cases = (classify_rules(), 100u16..1000, header_map(), answer_body());
    fuzz("classify", cases, |(rules, status, headers, body)| {
        let Ok(status) = StatusCode::from_u16(status) else {
            return;
        };
        let outcome = crate::replay::classify::classify(&rules, status, &headers, &body);
        let _ = outcome.class();
        let _ = outcome.final_status();
        let _ = crate::replay::classify::is_transient(&rules, status);
        // The contract's defaults, whatever the headers and body say.
        let defaults = ClassifyConfig::default();
        let default = crate::replay::classify::classify(&defaults, status, &headers, &body);
        let code = status.as_u16();
        if [408, 425, 429, 500, 502, 503, 504].contains(&code) {
            assert_eq!(default.class(), "retryable", "{code}");
        } else if code == 401 {
            assert_eq!(default.class(), "auth_required");
        } else if code == 409 || code == 412 {
            assert_eq!(default.class(), "conflict");
        } else if (400..500).contains(&code) || code == 501 || code == 505 {
            assert_eq!(default.class(), "validation", "{code}");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Header values the cache and replay parse
// ---------------------------------------------------------------------------------------------

#[test]
fn cache_and_replay_header_values_never_panic_and_stay_bounded() {
    let cases = (
        header_map(),
        header_map(),
        prop::sample::select(vec![200u16, 203, 204, 301, 404, 410, 500]),
        prop::sample::select(vec![
            crate::cache::Audience::Everyone,
            crate::cache::Audience::Anonymous,
            crate::cache::Audience::Caller,
        ]),
        0u64..u64::MAX,
    );
    fuzz(
        "cache_headers",
        cases,
        |(request, response, status, audience, default_ttl)| {
            let status = StatusCode::from_u16(status).expect("a listed status");
            let default_ttl = std::time::Duration::from_secs(default_ttl % (1 << 40));
            if let Some(s) =
                crate::cache::storable(&request, status, &response, audience, default_ttl)
            {
                // Lifetimes are capped (2^31 s), so time arithmetic never overflows.
                assert!(s.fresh_for <= default_ttl.max(std::time::Duration::from_secs(1 << 31)));
                assert!(s.initial_age_s <= 1 << 31);
                assert!(!s.vary.iter().any(|v| v == "*"), "Vary: * is never stored");
                // A stored answer's Vary names are used as header names to build keys.
                let key = crate::cache::PrimaryKey::new(
                    &http::Method::GET,
                    "h",
                    "/p",
                    &crate::context::Identity([0; 32]),
                );
                let _ = key.with_vary(&s.vary, &request);
            }
            if let Some(after) = crate::replay::classify::retry_after(&response) {
                // Added to "now" by the backoff: must not overflow there.
                let _ = crate::replay::backoff::delay(
                    &crate::config::ReplayConfig::default(),
                    1,
                    Some(after),
                );
                let _ = crate::store::rfc3339_ms(
                    crate::store::now_ms().saturating_add(crate::store::millis(after)),
                );
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// HAR loading
// ---------------------------------------------------------------------------------------------

/// HAR-ish JSON: real structure with fields of the wrong type, missing, or odd; cut files.
fn har_text() -> impl Strategy<Value = String> {
    let url = prop_oneof![
        Just("http://a/x?q=1".to_owned()),
        Just("https://h:99999/".to_owned()),
        Just("not a url".to_owned()),
        Just("http://[::1/x".to_owned()),
        text(24),
    ];
    let method = prop_oneof![
        Just("GET".to_owned()),
        Just("POST".to_owned()),
        Just("".to_owned()),
        Just("G ET".to_owned()),
        text(8),
    ];
    let time = prop_oneof![
        Just("2026-01-01T00:00:00.000Z".to_owned()),
        Just("2026-01-01T01:00:00.123456+01:00".to_owned()),
        Just("9999-99-99T99:99:99Z".to_owned()),
        Just("-1".to_owned()),
        text(30),
    ];
    let post = prop_oneof![
        Just(serde_json::Value::Null),
        text(20).prop_map(|t| serde_json::json!({"text": t})),
        text(20).prop_map(|t| serde_json::json!({"text": t, "encoding": "base64"})),
        text(10).prop_map(|t| serde_json::json!({"params": [{"name": t, "value": 1}]})),
        Just(serde_json::json!({"text": 5})),
    ];
    let headers = prop_oneof![
        Just(serde_json::json!([])),
        (text(12), text(12)).prop_map(|(n, v)| serde_json::json!([{"name": n, "value": v}])),
        Just(serde_json::json!({"name": "x"})),
        Just(serde_json::json!([{"name": 1}])),
    ];
    let entry = (method, url, time, post, headers).prop_map(|(m, u, t, p, h)| {
        serde_json::json!({
            "startedDateTime": t,
            "request": {"method": m, "url": u, "headers": h, "postData": p},
        })
    });
    let doc = prop::collection::vec(entry, 0..5)
        .prop_map(|entries| serde_json::json!({"log": {"version": "1.2", "entries": entries}}));
    prop_oneof![
        3 => doc.clone().prop_map(|d| d.to_string()),
        // A recording cut anywhere by a crash.
        2 => (doc, any::<prop::sample::Index>()).prop_map(|(d, at)| {
            let text = serde_json::to_string_pretty(&d).unwrap_or_default();
            let cut = at.index(text.len() + 1);
            text.char_indices()
                .take_while(|(i, _)| *i < cut)
                .map(|(_, c)| c)
                .collect()
        }),
        1 => any::<String>(),
    ]
}

#[test]
fn har_loader_answers_every_file_with_entries_or_a_clean_error() {
    fuzz(
        "har",
        har_text(),
        |text| match crate::loadtest::har::parse(&text) {
            Ok(entries) => {
                for e in entries {
                    assert!(e.offset_ms.is_finite(), "{e:?}");
                    assert!(e.path_and_query.starts_with('/'), "{e:?}");
                }
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Idempotency keys
// ---------------------------------------------------------------------------------------------

#[test]
fn idempotency_keys_are_accepted_exactly_when_they_are_1_to_255_visible_ascii_chars() {
    let keys = prop_oneof![
        proptest::string::string_regex("[!-~]{0,300}")
            .expect("regex")
            .prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..300),
        (
            proptest::string::string_regex("[!-~]{1,254}").expect("regex"),
            any::<u8>()
        )
            .prop_map(|(s, b)| {
                let mut v = s.into_bytes();
                v.push(b);
                v
            }),
    ];
    fuzz("idempotency_key", keys, |bytes| {
        let Ok(value) = HeaderValue::from_bytes(&bytes) else {
            return;
        };
        let valid = !bytes.is_empty()
            && bytes.len() <= 255
            && bytes.iter().all(|b| (0x21..=0x7e).contains(b));
        match crate::outbox::valid_key(&value) {
            Ok(key) => {
                assert!(valid, "accepted {bytes:?}");
                assert_eq!(key.as_bytes(), bytes.as_slice());
            }
            Err(e) => {
                assert!(!valid, "refused {bytes:?}");
                assert_eq!(e.status_and_code().0, StatusCode::BAD_REQUEST);
            }
        }
    });
}
