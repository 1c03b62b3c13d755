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
        let resp = self
            .http
            .get(format!("{}/_outpost/mutations/{key}", self.outpost.url()))
            .send()
            .await
            .expect("status document");
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
