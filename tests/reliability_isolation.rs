//! Reliability suite, isolation as a property (issue #21, point 5): over random pairs of callers
//! (random `Authorization`, `Cookie`, `X-Api-Key` and `Api-Key` lines: absent, empty,
//! repeated, with header-name case variants and surrounding whitespace), one caller never
//! receives another's cached answer, overlaid write or mutation status.
//!
//! One real outpost and one upstream serve every case (each case uses paths and keys of its
//! own). Requests go over raw TCP so that the header lines are sent exactly as generated. The
//! upstream's answers are caller-specific (it echoes the request's `X-Whoami` tag), so a copy
//! served to the wrong caller is visible. Two callers are *the same identity* when their
//! identity header values, trimmed as HTTP trims them, are equal name by name in order — the
//! test's own model; whenever the model says they differ, nothing of one may reach the other.
//! Each property also checks the owner does get its own data, so it cannot pass vacuously.
//!
//! Cases: 200 in CI, 5 000 with `OUTPOST_RELIABILITY_FULL=1`.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::reliability::{full, report};
use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Cache-first reads (a stored copy is served without asking the upstream), an overlay route
/// whose writes are always queued, and replay paused by the test so that they stay pending.
const CONFIG: &str = r#"
[cache]
default_ttl = "1h"

[[route]]
name = "cached"
path = "/echo/iso/"
read = "cache-first"

[[route]]
name = "overlaid"
path = "/echo/ov"
write = "write-behind"
overlay = true
item = "/echo/ov/{id}"
"#;

const IDENTITY_HEADERS: [&str; 4] = ["authorization", "cookie", "x-api-key", "api-key"];

/// One header line as sent: the name's spelling and the raw value (maybe padded).
#[derive(Debug, Clone)]
struct Line {
    name: String,
    value: String,
}

/// A caller: its identity header lines, in order.
#[derive(Debug, Clone)]
struct Caller {
    lines: Vec<Line>,
}

impl Caller {
    /// The identity as the model sees it: per identity header, its trimmed values in order.
    fn identity(&self) -> Vec<Vec<String>> {
        IDENTITY_HEADERS
            .iter()
            .map(|h| {
                self.lines
                    .iter()
                    .filter(|l| l.name.eq_ignore_ascii_case(h))
                    .map(|l| l.value.trim_matches([' ', '\t']).to_owned())
                    .collect()
            })
            .collect()
    }

    fn head_lines(&self) -> String {
        self.lines
            .iter()
            .map(|l| format!("{}:{}\r\n", l.name, l.value))
            .collect()
    }
}

fn name_variant(name: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        Just(name.to_owned()),
        Just(name.to_ascii_uppercase()),
        Just(
            name.split('-')
                .map(|w| {
                    let mut c = w.chars();
                    c.next()
                        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                        .unwrap_or_default()
                })
                .collect::<Vec<_>>()
                .join("-")
        ),
    ]
}

fn value() -> impl Strategy<Value = String> {
    // A small pool, so that equal identities (which may share) come up as well as different
    // ones that differ only slightly.
    let core = prop::sample::select(vec![
        "Bearer alice",
        "Bearer bob",
        "bearer alice",
        "Bearer  alice",
        "alice",
        "bob",
        "sid=1",
        "sid=1; theme=dark",
        "",
    ]);
    let pad = prop::sample::select(vec!["", " ", "  ", "\t", " \t"]);
    (pad.clone(), core, pad).prop_map(|(a, v, b)| format!("{a}{v}{b}"))
}

fn caller() -> impl Strategy<Value = Caller> {
    let line = prop::sample::select(IDENTITY_HEADERS.to_vec())
        .prop_flat_map(|name| (name_variant(name), value()))
        .prop_map(|(name, value)| Line { name, value });
    prop::collection::vec(line, 0..4).prop_map(|lines| Caller { lines })
}

/// A pair of callers; often the second is the first with its lines re-spelt (same identity).
fn pair() -> impl Strategy<Value = (Caller, Caller)> {
    prop_oneof![
        2 => (caller(), caller()),
        1 => caller().prop_flat_map(|a| {
            let respelt = a
                .lines
                .iter()
                .map(|l| {
                    let name: &'static str = IDENTITY_HEADERS
                        .iter()
                        .find(|h| h.eq_ignore_ascii_case(&l.name))
                        .copied()
                        .unwrap_or("authorization");
                    (name_variant(name), Just(l.value.clone()))
                        .prop_map(|(name, value)| Line {
                            name,
                            value: format!(" {value}"),
                        })
                })
                .collect::<Vec<_>>();
            (Just(a), respelt.prop_map(|lines| Caller { lines }))
        }),
    ]
}

/// A raw answer: status, head (lowercase) and the de-chunked body.
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request on its own connection (`Connection: close`), read to the end.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    caller: &Caller,
    extra: &str,
    body: &str,
) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: outpost.test\r\nConnection: close\r\n{}{extra}Content-Length: {}\r\n\r\n{body}",
        caller.head_lines(),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut all))
        .await
        .expect("an answer within 20 s")
        .expect("read");
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(&all)));
    let head = String::from_utf8_lossy(&all[..split]).to_ascii_lowercase();
    let mut rest = all[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut body = Vec::new();
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&rest[..eol])
                    .split(';')
                    .next()
                    .unwrap_or("0")
                    .trim(),
                16,
            )
            .unwrap_or(0);
            if size == 0 {
                break;
            }
            body.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = rest[eol + 2 + size + 2..].to_vec();
        }
        rest = body;
    }
    let status = head[9..12].parse().expect("status");
    Answer {
        status,
        head,
        body: rest,
    }
}

/// The `X-Whoami` tag the upstream echoed into an answer.
fn whoami(answer: &Answer) -> String {
    answer.json()["headers"]["x-whoami"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn one_caller_never_receives_another_callers_cached_answer_overlaid_write_or_mutation_status() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let s = rt.block_on(async {
        let s = setup::Outpost::in_front_of(Upstream::start().await, CONFIG).await;
        let resp = s
            .http
            .post(s.admin_url("/sync/pause"))
            .send()
            .await
            .expect("pause replay");
        assert!(resp.status().is_success(), "pause: {}", resp.status());
        s
    });
    let addr = s.outpost.addr();
    let cases = if full() { 5_000 } else { 200 };
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        // Each case talks to the real process: shrinking is kept short.
        max_shrink_iters: 64,
        ..RunnerConfig::default()
    });
    let n = AtomicU64::new(0);
    let same = AtomicU64::new(0);
    let result = runner.run(&pair(), |(a, b)| {
        let case = n.fetch_add(1, Ordering::SeqCst);
        let same_identity = a.identity() == b.identity();
        if same_identity {
            same.fetch_add(1, Ordering::SeqCst);
        }
        let result = rt.block_on(check_pair(addr, case, &a, &b, same_identity));
        if case % DRAIN_EVERY == DRAIN_EVERY - 1 {
            rt.block_on(drain(&s));
        }
        result
    });
    let executions = n.load(Ordering::SeqCst);
    report(
        "isolation",
        "identities",
        json!({
            "cases": executions,
            "same_identity_pairs": same.load(Ordering::SeqCst),
            "failed": u64::from(result.is_err()),
        }),
    );
    if let Err(e) = result {
        let log = s.outpost.log_tail(20);
        panic!("{e}\n{log}");
    }
    drop(s);
}

/// Cases between drains of the queue: the overlay looks at the oldest 1 000 pending items of a
/// partition only (`overlay.rs`, `PEEK_LIMIT`), so the test keeps fewer pending than that.
const DRAIN_EVERY: u64 = 400;

/// Let replay drain every pending write, then pause it again.
async fn drain(s: &setup::Outpost) {
    let admin = |path: &'static str| s.http.post(s.admin_url(path)).send();
    assert!(
        admin("/sync/resume")
            .await
            .expect("resume")
            .status()
            .is_success()
    );
    eventually(Duration::from_secs(60), "the queue drained", || async {
        let status: Value = s
            .http
            .get(s.admin_url("/status"))
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("JSON");
        status["queue_depth"] == 0
    })
    .await;
    assert!(
        admin("/sync/pause")
            .await
            .expect("pause")
            .status()
            .is_success()
    );
}

async fn check_pair(
    addr: SocketAddr,
    case: u64,
    a: &Caller,
    b: &Caller,
    same_identity: bool,
) -> Result<(), TestCaseError> {
    // --- Cached answers: A's copy is stored; B asks for the same URL.
    let path = format!("/echo/iso/{case}");
    let tag_a = format!("a-{case}");
    let tag_b = format!("b-{case}");
    let first = request(addr, "GET", &path, a, &format!("X-Whoami: {tag_a}\r\n"), "").await;
    prop_assert_eq!(first.status, 200, "{}", first.text());
    prop_assert_eq!(whoami(&first), tag_a.clone());
    // The owner gets its copy from the cache (so the property is not vacuous).
    let again = request(
        addr,
        "GET",
        &path,
        a,
        &format!("X-Whoami: {tag_a}-again\r\n"),
        "",
    )
    .await;
    prop_assert!(
        again.head.contains("cache-status: outpost; hit"),
        "{}",
        again.head
    );
    prop_assert_eq!(whoami(&again), tag_a.clone());
    let other = request(addr, "GET", &path, b, &format!("X-Whoami: {tag_b}\r\n"), "").await;
    prop_assert_eq!(other.status, 200);
    if !same_identity {
        prop_assert_eq!(whoami(&other), tag_b.clone(), "B got A's cached answer");
    }

    // --- Overlaid writes: A's PUT stays pending (replay paused); B reads the item.
    let item = format!("/echo/ov/{case}");
    let key = format!("iso-key-{case}");
    let secret = format!("owner-a-{case}");
    let put = request(
        addr,
        "PUT",
        &item,
        a,
        &format!("Idempotency-Key: {key}\r\nContent-Type: application/json\r\n"),
        &json!({"id": case.to_string(), "secret": secret}).to_string(),
    )
    .await;
    prop_assert_eq!(put.status, 202, "{}", put.text());
    let own = request(addr, "GET", &item, a, "", "").await;
    prop_assert!(
        own.text().contains(&secret),
        "the owner sees its write: {}",
        own.text()
    );
    let seen = request(addr, "GET", &item, b, "", "").await;
    if !same_identity {
        prop_assert!(
            !seen.text().contains(&secret),
            "B saw A's pending write: {}",
            seen.text()
        );
        prop_assert!(!seen.head.contains("outpost-pending"), "{}", seen.head);
    }

    // --- Mutation status: the document and the list.
    let doc_path = format!("/_outpost/mutations/{key}");
    let own_doc = request(addr, "GET", &doc_path, a, "", "").await;
    prop_assert_eq!(own_doc.status, 200, "{}", own_doc.text());
    let doc = request(addr, "GET", &doc_path, b, "", "").await;
    let list = request(addr, "GET", "/_outpost/mutations", b, "", "").await;
    if !same_identity {
        prop_assert_eq!(
            doc.status,
            404,
            "B read A's mutation status: {}",
            doc.text()
        );
        prop_assert!(
            !list.text().contains(&key),
            "B's list holds A's key: {}",
            list.text()
        );
    } else {
        prop_assert_eq!(doc.status, 200, "the same identity reads its own status");
    }
    Ok(())
}
