//! Sync semantics (issue #20, points 1 and 4): what a route does with a replayed mutation's
//! conflict, and how the acceptance time reaches the upstream. The real binary, a real upstream
//! on loopback that answers 412 on cue.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// The test's outpost, with helpers for queueing and reading status documents.
struct Setup(Outpost);

impl std::ops::Deref for Setup {
    type Target = Outpost;
    fn deref(&self) -> &Outpost {
        &self.0
    }
}

impl Setup {
    /// Upstream down, outpost started with [`FAST`] (its `[replay]` extended by `replay`) and
    /// `routes`.
    async fn offline(replay: &str, routes: &str) -> Setup {
        Setup(Outpost::offline(&config_with_replay(replay, routes)).await)
    }

    async fn queue(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.outpost.url()))
            .header("Idempotency-Key", key)
            .header("Content-Type", "application/json")
            .body(body.to_string());
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let resp = req.send().await.expect("mutation");
        assert_eq!(resp.status(), 202, "queued");
    }

    async fn doc(&self, key: &str) -> Value {
        self.doc_as(key, &[]).await
    }

    /// The status document as the caller with `headers` sees it.
    async fn doc_as(&self, key: &str, headers: &[(&str, &str)]) -> Value {
        let mut req = self
            .http
            .get(format!("{}/_outpost/mutations/{key}", self.outpost.url()));
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let resp = req.send().await.expect("status document");
        resp.json().await.unwrap_or(Value::Null)
    }

    async fn wait_status(&self, key: &str, want: &str) -> Value {
        let mut last = Value::Null;
        for _ in 0..500 {
            let doc = self.doc(key).await;
            if doc["status"] == want {
                return doc;
            }
            last = doc;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{key} never reached {want}: {last}");
    }

    async fn dead_letters(&self) -> Value {
        self.http
            .get(format!("{}/dead-letters", self.outpost.admin_url()))
            .send()
            .await
            .expect("dead letters")
            .json()
            .await
            .expect("json")
    }
}

#[tokio::test]
async fn server_wins_records_the_conflict_without_a_dead_letter_and_the_partition_goes_on() {
    let s = Setup::offline(
        "",
        "[[route]]\npath = \"/apply/doc/\"\nconflict = \"server-wins\"\n",
    )
    .await;
    s.upstream.script(
        "/apply/doc/1",
        vec![ScriptedResponse::json(
            412,
            json!({"error": "changed meanwhile"}),
        )],
    );
    s.queue(
        reqwest::Method::PUT,
        "/apply/doc/1",
        "sw-1",
        &[("If-Match", "\"v1\"")],
        r#"{"title":"mine"}"#,
    )
    .await;
    s.queue(
        reqwest::Method::PUT,
        "/apply/doc/2",
        "sw-2",
        &[],
        r#"{"title":"other"}"#,
    )
    .await;
    s.upstream.restart().await;
    let doc = s.wait_status("sw-1", "conflict").await;
    assert_eq!(
        doc["outcome"], "conflict: server wins (not applied)",
        "{doc}"
    );
    assert_eq!(doc["upstream_status"], 412);
    s.wait_status("sw-2", "succeeded").await;
    let dead = s.dead_letters().await;
    assert!(
        !dead.to_string().contains("sw-1"),
        "not a dead letter: {dead}"
    );
    assert_eq!(s.upstream.requests_to("/apply/doc/1").len(), 1, "sent once");
}

#[tokio::test]
async fn client_wins_sends_it_once_more_without_its_preconditions() {
    let s = Setup::offline(
        "",
        "[[route]]\npath = \"/apply/doc/\"\nconflict = \"client-wins\"\n",
    )
    .await;
    s.upstream.script(
        "/apply/doc/1",
        vec![
            ScriptedResponse::json(412, json!({"error": "changed meanwhile"})),
            ScriptedResponse::passthrough(),
        ],
    );
    s.queue(
        reqwest::Method::PUT,
        "/apply/doc/1",
        "cw-1",
        &[("If-Match", "\"v1\"")],
        r#"{"title":"mine"}"#,
    )
    .await;
    // Without preconditions a client-wins conflict cannot be resolved: a dead letter.
    s.upstream.script(
        "/apply/doc/2",
        vec![ScriptedResponse::json(409, json!({"error": "duplicate"}))],
    );
    s.queue(
        reqwest::Method::POST,
        "/apply/doc/2",
        "cw-2",
        &[],
        r#"{"title":"dup"}"#,
    )
    .await;
    s.upstream.restart().await;
    let doc = s.wait_status("cw-1", "succeeded").await;
    assert_eq!(doc["upstream_status"], 201, "{doc}");
    let sent = s.upstream.requests_to("/apply/doc/1");
    assert_eq!(sent.len(), 2, "the original and one more");
    assert_eq!(sent[0].header("if-match"), Some("\"v1\""));
    assert_eq!(
        sent[1].header("if-match"),
        None,
        "sent again without the precondition"
    );
    let doc = s.wait_status("cw-2", "conflict").await;
    assert!(
        doc["outcome"]
            .as_str()
            .unwrap_or("")
            .contains("no precondition"),
        "{doc}"
    );
    assert!(s.dead_letters().await.to_string().contains("cw-2"));
}

#[tokio::test]
async fn the_acceptance_time_header_is_configurable_and_a_route_can_put_it_in_the_body() {
    let s = Setup::offline(
        "accepted_at_header = \"X-Client-Time\"",
        "[[route]]\npath = \"/apply/lww/\"\naccepted_at_field = \"/meta/client_time\"\n",
    )
    .await;
    s.queue(
        reqwest::Method::PUT,
        "/apply/lww/1",
        "at-1",
        &[],
        r#"{"v":1,"meta":{}}"#,
    )
    .await;
    s.queue(
        reqwest::Method::PUT,
        "/apply/other/1",
        "at-2",
        &[],
        r#"{"v":2}"#,
    )
    .await;
    s.upstream.restart().await;
    let applied = s.upstream.wait_applied(2, Duration::from_secs(20)).await;
    let (lww, other) = (&applied[0], &applied[1]);
    let header = lww
        .headers
        .get("x-client-time")
        .and_then(|v| v.to_str().ok())
        .expect("header");
    assert!(lww.headers.get("outpost-accepted-at").is_none(), "renamed");
    assert_eq!(
        lww.body_json()["meta"]["client_time"],
        header,
        "the same time in the body"
    );
    assert_eq!(lww.body_json()["v"], 1);
    assert_eq!(
        other.body_json(),
        json!({"v": 2}),
        "other routes' bodies unchanged"
    );

    let s = Setup::offline("accepted_at_header = \"\"", "").await;
    s.queue(reqwest::Method::POST, "/apply/x", "at-3", &[], "{}")
        .await;
    s.upstream.restart().await;
    let applied = s.upstream.wait_applied(1, Duration::from_secs(20)).await;
    assert!(
        applied[0].headers.get("outpost-accepted-at").is_none(),
        "disabled"
    );
}

// ---------------------------------------------------------------------------------------------
// #20 points 2, 3 and 5: version capture, coalescing, and what shows them. The upstream's
// `/versioned/...` records keep an ETag version each and ignore `Idempotency-Key`: every write
// that reaches them is applied (or refused with 412), so counting its writes counts
// applications.
// ---------------------------------------------------------------------------------------------

/// Routes of these tests: capture on `/versioned/cap/`, coalescing on `/versioned/co/`,
/// neither on the rest of `/versioned/`.
const SYNC_ROUTES: &str = r#"
[[route]]
path = "/versioned/cap/"
capture_version = true

[[route]]
path = "/versioned/co/"
coalesce = true

[[route]]
path = "/versioned/"
"#;

impl Setup {
    /// outpost with [`FAST`], `store` (extra config, e.g. a Redis store) and [`SYNC_ROUTES`]
    /// in front of `upstream`.
    async fn with(upstream: Upstream, store: &str) -> Setup {
        Setup(Outpost::in_front_of(upstream, &format!("{FAST}\n{store}\n{SYNC_ROUTES}")).await)
    }

    /// Send a mutation through outpost; its status and JSON answer.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, self.url(path))
            .header("Idempotency-Key", key)
            .header("Content-Type", "application/merge-patch+json")
            .body(body.to_string());
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let resp = req.send().await.expect("mutation");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn admin_post(&self, path: &str) {
        let resp = self
            .http
            .post(self.admin_url(path))
            .send()
            .await
            .expect("admin");
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
    }

    async fn metrics(&self) -> String {
        self.http
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }
}

/// A direct write to the upstream (the other writer, not through outpost).
async fn direct(upstream: &Upstream, method: reqwest::Method, path: &str, body: Value) -> u16 {
    client()
        .request(method, format!("{}{path}", upstream.url()))
        .json(&body)
        .send()
        .await
        .expect("direct write")
        .status()
        .as_u16()
}

/// The JSON body of the upstream's writes to `path` outpost sent, in order.
fn writes_to(upstream: &Upstream, path: &str) -> Vec<VersionedWrite> {
    upstream
        .versioned_writes()
        .into_iter()
        .filter(|w| w.path == path && w.key.is_some())
        .collect()
}

#[tokio::test]
async fn version_capture_turns_a_silent_overwrite_into_a_conflict() {
    let upstream = Upstream::start().await;
    for path in ["/versioned/cap/1", "/versioned/plain/1"] {
        assert_eq!(
            direct(
                &upstream,
                reqwest::Method::PUT,
                path,
                json!({"title": "v1"})
            )
            .await,
            200
        );
    }
    let s = Setup::with(upstream, "").await;
    // The app reads both (outpost serves and caches them, ETag "v1")...
    for path in ["/versioned/cap/1", "/versioned/plain/1"] {
        let resp = s.http.get(s.url(path)).send().await.expect("read");
        assert_eq!(resp.headers()["etag"], "\"v1\"");
    }
    // ...goes offline and edits both, with no precondition of its own.
    s.upstream.stop().await;
    s.queue(
        reqwest::Method::PUT,
        "/versioned/cap/1",
        "cap-1",
        &[],
        r#"{"title":"mine"}"#,
    )
    .await;
    s.queue(
        reqwest::Method::PUT,
        "/versioned/plain/1",
        "plain-1",
        &[],
        r#"{"title":"mine"}"#,
    )
    .await;
    // Meanwhile a colleague changes both on the server.
    s.admin_post("/sync/pause").await;
    s.upstream.restart().await;
    for path in ["/versioned/cap/1", "/versioned/plain/1"] {
        assert_eq!(
            direct(
                &s.upstream,
                reqwest::Method::PUT,
                path,
                json!({"title": "theirs"})
            )
            .await,
            200
        );
    }
    s.admin_post("/sync/resume").await;

    let doc = s.wait_status("cap-1", "conflict").await;
    assert_eq!(doc["upstream_status"], 412, "{doc}");
    let sent = writes_to(&s.upstream, "/versioned/cap/1");
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        sent[0].if_match.as_deref(),
        Some("\"v1\""),
        "the version it served"
    );
    assert_eq!(
        s.upstream.versioned("/versioned/cap/1").map(|(_, v)| v),
        Some(json!({"title": "theirs"})),
        "the colleague's change was not overwritten"
    );
    assert!(
        s.dead_letters().await.to_string().contains("cap-1"),
        "dead-letter policy"
    );
    // The route without capture overwrites silently, as before.
    s.wait_status("plain-1", "succeeded").await;
    assert_eq!(
        s.upstream.versioned("/versioned/plain/1").map(|(_, v)| v),
        Some(json!({"title": "mine"}))
    );
    let sent = writes_to(&s.upstream, "/versioned/plain/1");
    assert_eq!(sent[0].if_match, None);
    assert!(
        s.metrics()
            .await
            .contains("outpost_conflicts_total{policy=\"dead-letter\"} 1"),
        "{}",
        s.metrics().await
    );
}

#[tokio::test]
async fn a_captured_version_does_not_fail_the_second_queued_write_of_the_same_uri() {
    let upstream = Upstream::start().await;
    direct(
        &upstream,
        reqwest::Method::PUT,
        "/versioned/cap/2",
        json!({"n": 0}),
    )
    .await;
    let s = Setup::with(upstream, "").await;
    s.http
        .get(s.url("/versioned/cap/2"))
        .send()
        .await
        .expect("read");
    s.upstream.stop().await;
    s.queue(
        reqwest::Method::PATCH,
        "/versioned/cap/2",
        "two-1",
        &[],
        r#"{"n":1}"#,
    )
    .await;
    s.queue(
        reqwest::Method::PATCH,
        "/versioned/cap/2",
        "two-2",
        &[],
        r#"{"m":2}"#,
    )
    .await;
    s.upstream.restart().await;
    s.wait_status("two-2", "succeeded").await;
    s.wait_status("two-1", "succeeded").await;
    let sent = writes_to(&s.upstream, "/versioned/cap/2");
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0].if_match.as_deref(), Some("\"v1\""));
    assert_eq!(
        sent[1].if_match, None,
        "outpost's own write moved the version on"
    );
    assert_eq!(
        s.upstream.versioned("/versioned/cap/2").map(|(_, v)| v),
        Some(json!({"n": 1, "m": 2}))
    );
}

/// How many merge patches the coalescing test queues (`OUTPOST_COALESCE_PATCHES`).
fn patches(default: usize) -> usize {
    std::env::var("OUTPOST_COALESCE_PATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// N merge patches to one URI, a write to another URI after every tenth, replayed: the patches
/// as one request (in the place of the first), the other writes in their order.
async fn merge_patches_replay_as_one_request(store: &str, n: usize) {
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let s = Setup::with(upstream, store).await;
    let doc = "/versioned/co/doc";
    // The state the patches make, applied one by one.
    let mut expected = json!({});
    let mut others = Vec::new();
    for i in 0..n {
        // Every seventh patch also removes an earlier field (null).
        let patch = if i % 7 == 6 {
            json!({format!("f{i}"): i, format!("f{}", i - 3): null})
        } else {
            json!({format!("f{i}"): i, "nested": {"last": i}})
        };
        merge(&mut expected, &patch);
        let (status, body) = s
            .send(
                reqwest::Method::PATCH,
                doc,
                &format!("p-{i}"),
                &[],
                &patch.to_string(),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        if i % 10 == 9 {
            let other = format!("/versioned/co/other-{i}");
            let (status, _) = s
                .send(
                    reqwest::Method::PUT,
                    &other,
                    &format!("o-{i}"),
                    &[],
                    &json!({"i": i}).to_string(),
                )
                .await;
            assert_eq!(status, 202);
            others.push(other);
        }
    }
    // The folded keys say so, and still answer their own retries.
    let first = s.doc("p-0").await;
    assert_eq!(first["status"], "coalesced", "{first}");
    assert_eq!(first["coalesced_into"], "p-1");
    let (status, again) = s
        .send(
            reqwest::Method::PATCH,
            doc,
            "p-0",
            &[],
            &json!({"f0": 0, "nested": {"last": 0}}).to_string(),
        )
        .await;
    assert_eq!(
        (status, &again["status"]),
        (202, &json!("coalesced")),
        "{again}"
    );
    assert_eq!(s.doc(&format!("p-{}", n - 1)).await["status"], "queued");
    let queue: Value = s
        .http
        .get(s.admin_url("/status"))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    assert_eq!(queue["queue_depth"], 1 + others.len(), "{queue}");

    s.upstream.restart().await;
    let writes = s
        .upstream
        .wait_versioned_writes(1 + others.len(), Duration::from_secs(60))
        .await;
    s.wait_status(&format!("p-{}", n - 1), "succeeded").await;
    assert_eq!(writes.len(), 1 + others.len(), "nothing else was sent");
    assert_eq!(writes[0].method, "PATCH");
    assert_eq!(
        writes[0].path, doc,
        "the merged write in the place of the first"
    );
    assert_eq!(
        writes[0].key.as_deref(),
        Some(format!("p-{}", n - 1).as_str())
    );
    let mut applied_once = json!({});
    merge(&mut applied_once, &writes[0].body_json());
    assert_eq!(
        applied_once, expected,
        "one patch with the effect of all of them"
    );
    assert_eq!(
        writes[0].body_json()["f3"],
        Value::Null,
        "a removal stays a removal"
    );
    let order: Vec<&str> = writes[1..].iter().map(|w| w.path.as_str()).collect();
    assert_eq!(
        order,
        others.iter().map(String::as_str).collect::<Vec<_>>(),
        "in order"
    );
    assert_eq!(s.upstream.versioned(doc).map(|(_, v)| v), Some(expected));
    let metrics = s.metrics().await;
    assert!(
        metrics.contains(&format!("outpost_coalesced_total {}", n - 1)),
        "{metrics}"
    );
}

/// RFC 7396, for the expected states.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().expect("object");
    for (k, v) in patch {
        if v.is_null() {
            map.remove(k);
        } else {
            merge(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

#[tokio::test]
async fn queued_merge_patches_to_one_uri_replay_as_one_request_and_other_uris_keep_their_order() {
    merge_patches_replay_as_one_request("", patches(1000)).await;
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test]
async fn redis_queued_merge_patches_to_one_uri_replay_as_one_request() {
    let redis = RedisServer::start();
    let store = format!(
        "[store]\nbackend = \"redis\"\nredis_url = \"{}\"\n",
        redis.url()
    );
    merge_patches_replay_as_one_request(&store, patches(300)).await;
}

#[tokio::test]
async fn a_delete_after_queued_puts_replays_as_the_delete_alone() {
    let upstream = Upstream::start().await;
    direct(
        &upstream,
        reqwest::Method::PUT,
        "/versioned/co/d",
        json!({"v": 0}),
    )
    .await;
    upstream.stop().await;
    let s = Setup::with(upstream, "").await;
    s.queue(
        reqwest::Method::PUT,
        "/versioned/co/d",
        "d-1",
        &[],
        r#"{"v":1}"#,
    )
    .await;
    s.queue(
        reqwest::Method::PATCH,
        "/versioned/co/d",
        "d-2",
        &[],
        r#"{"w":2}"#,
    )
    .await;
    s.queue(
        reqwest::Method::PUT,
        "/versioned/co/d",
        "d-3",
        &[],
        r#"{"v":3}"#,
    )
    .await;
    s.queue(reqwest::Method::DELETE, "/versioned/co/d", "d-4", &[], "")
        .await;
    assert_eq!(s.doc("d-1").await["coalesced_into"], "d-2");
    assert_eq!(s.doc("d-3").await["coalesced_into"], "d-4");
    s.upstream.restart().await;
    s.wait_status("d-4", "succeeded").await;
    let sent = writes_to(&s.upstream, "/versioned/co/d");
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].method, "DELETE");
    assert_eq!(s.upstream.versioned("/versioned/co/d"), None);
    for key in ["d-1", "d-2", "d-3"] {
        assert_eq!(s.doc(key).await["status"], "coalesced");
    }
}

#[tokio::test]
async fn coalescing_never_folds_into_an_item_in_flight_nor_across_callers() {
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let s = Setup::with(upstream, "").await;
    // Another caller's write to the URI stands between two of alice's: nothing folds.
    let alice = [("Authorization", "Bearer alice")];
    let bob = [("Authorization", "Bearer bob")];
    s.queue(
        reqwest::Method::PATCH,
        "/versioned/co/shared",
        "a-1",
        &alice,
        r#"{"a":1}"#,
    )
    .await;
    s.queue(
        reqwest::Method::PATCH,
        "/versioned/co/shared",
        "b-1",
        &bob,
        r#"{"b":1}"#,
    )
    .await;
    s.queue(
        reqwest::Method::PATCH,
        "/versioned/co/shared",
        "a-2",
        &alice,
        r#"{"c":1}"#,
    )
    .await;
    // The first write of another URI will be in flight (slow) when the next one arrives.
    s.queue(
        reqwest::Method::PATCH,
        "/versioned/co/slow",
        "s-1",
        &alice,
        r#"{"s":1}"#,
    )
    .await;
    s.upstream.script(
        "/versioned/co/slow",
        vec![
            ScriptedResponse::passthrough().delay(Duration::from_millis(1500)),
            ScriptedResponse::passthrough(),
        ],
    );
    s.upstream.restart().await;
    s.upstream
        .wait_requests("/versioned/co/slow", 1, Duration::from_secs(20))
        .await;
    assert_eq!(s.doc_as("s-1", &alice).await["status"], "in_flight");
    let (status, _) = s
        .send(
            reqwest::Method::PATCH,
            "/versioned/co/slow",
            "s-2",
            &alice,
            r#"{"t":2}"#,
        )
        .await;
    assert_eq!(status, 202, "queued behind the item in flight");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while s.doc_as("s-2", &alice).await["status"] != "succeeded" {
        assert!(std::time::Instant::now() < deadline, "s-2 never succeeded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        s.doc_as("s-1", &alice).await["status"],
        "succeeded",
        "not folded"
    );
    let slow = writes_to(&s.upstream, "/versioned/co/slow");
    assert_eq!(
        slow.iter().map(|w| w.body_json()).collect::<Vec<_>>(),
        [json!({"s": 1}), json!({"t": 2})]
    );
    let shared = writes_to(&s.upstream, "/versioned/co/shared");
    assert_eq!(
        shared
            .iter()
            .map(|w| w.key.clone().unwrap_or_default())
            .collect::<Vec<_>>(),
        ["a-1", "b-1", "a-2"],
        "every caller's write, in order"
    );
}
