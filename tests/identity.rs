//! Mutations belong to the caller that sent them (issue #14 points 1 and 7): the real binary, a
//! real upstream on loopback, two or three callers told apart by their `Authorization`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// The test's outpost, with helpers for requests as one caller or another.
struct Setup(Outpost);

impl std::ops::Deref for Setup {
    type Target = Outpost;
    fn deref(&self) -> &Outpost {
        &self.0
    }
}

impl Setup {
    async fn offline() -> Setup {
        Setup(Outpost::offline(FAST).await)
    }

    async fn post(&self, path: &str, key: &str, auth: Option<&str>, body: &str) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.outpost.url()))
            .header("Idempotency-Key", key)
            .header("Content-Type", "application/json")
            .body(body.to_string());
        if let Some(auth) = auth {
            req = req.header("Authorization", auth);
        }
        let resp = req.send().await.expect("POST");
        let status = resp.status().as_u16();
        let replayed = resp.headers().contains_key("idempotent-replayed");
        let mut doc: Value = resp.json().await.unwrap_or(Value::Null);
        if replayed {
            doc["_replayed"] = json!(true);
        }
        (status, doc)
    }

    async fn status_doc(&self, key: &str, auth: Option<&str>) -> (u16, Value) {
        let mut req = self
            .http
            .get(format!("{}/_outpost/mutations/{key}", self.outpost.url()));
        if let Some(auth) = auth {
            req = req.header("Authorization", auth);
        }
        let resp = req.send().await.expect("GET status document");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn wait_status(&self, key: &str, auth: Option<&str>, want: &str) -> Value {
        let mut last = Value::Null;
        for _ in 0..500 {
            let (code, doc) = self.status_doc(key, auth).await;
            if code == 200 && doc["status"] == want {
                return doc;
            }
            last = doc;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{key} never reached {want}; last {last}");
    }

    async fn admin(&self, method: reqwest::Method, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.outpost.admin_url()))
            .send()
            .await
            .expect("admin");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

const ALICE: &str = "Bearer alice-token";
const MALLORY: &str = "Bearer mallory-token";

#[tokio::test]
async fn another_caller_gets_404_for_the_status_document_and_422_for_the_key_never_the_answer() {
    let s = Setup::offline().await;
    let body = r#"{"card":"4111"}"#;
    let (code, _) = s.post("/apply/pay", "pay-1", Some(ALICE), body).await;
    assert_eq!(code, 202);

    // While queued: only Alice sees it or gets its 202 again.
    assert_eq!(s.status_doc("pay-1", Some(ALICE)).await.0, 200);
    assert_eq!(s.status_doc("pay-1", Some(MALLORY)).await.0, 404);
    assert_eq!(s.status_doc("pay-1", None).await.0, 404, "anonymous");
    assert_eq!(
        s.post("/apply/pay", "pay-1", Some(ALICE), body).await.0,
        202
    );
    let (code, doc) = s.post("/apply/pay", "pay-1", Some(MALLORY), body).await;
    assert_eq!(code, 422, "{doc}");
    assert_eq!(s.post("/apply/pay", "pay-1", None, body).await.0, 422);
    // The operator sees it.
    let (code, queue) = s.admin(reqwest::Method::GET, "/queue").await;
    assert_eq!(code, 200);
    assert!(queue.to_string().contains("pay-1"), "{queue}");

    s.upstream.restart().await;
    let doc = s.wait_status("pay-1", Some(ALICE), "succeeded").await;
    assert!(doc["upstream_body"].is_object(), "{doc}");

    // After completion: Alice gets the stored answer, nobody else does.
    let (code, doc) = s.post("/apply/pay", "pay-1", Some(ALICE), body).await;
    assert_eq!(code, 201);
    assert_eq!(doc["_replayed"], true, "{doc}");
    let (code, doc) = s.post("/apply/pay", "pay-1", Some(MALLORY), body).await;
    assert_eq!(code, 422, "{doc}");
    assert!(doc.get("_replayed").is_none());
    assert_eq!(s.status_doc("pay-1", Some(MALLORY)).await.0, 404);
    assert_eq!(s.upstream.seen_requests_for("pay-1"), 1);

    // The same for a mutation forwarded online.
    let (code, _) = s.post("/apply/pay", "pay-2", Some(ALICE), body).await;
    assert_eq!(code, 201);
    s.wait_status("pay-2", Some(ALICE), "succeeded").await;
    assert_eq!(
        s.post("/apply/pay", "pay-2", Some(MALLORY), body).await.0,
        422
    );
    assert_eq!(s.status_doc("pay-2", Some(MALLORY)).await.0, 404);
    assert_eq!(s.upstream.seen_requests_for("pay-2"), 1);
}

#[tokio::test]
async fn a_mutation_whose_principal_is_unknown_is_not_released_by_another_users_credentials() {
    let s = Setup::offline().await;
    s.upstream.script(
        "/apply/profile",
        vec![
            ScriptedResponse::json(401, json!({"error": "token expired"})),
            ScriptedResponse::passthrough(),
        ],
    );
    // An opaque token: outpost cannot tell whose it is (default replay.auth_principal).
    let (code, _) = s
        .post(
            "/apply/profile",
            "opaque-1",
            Some(ALICE),
            r#"{"name":"alice"}"#,
        )
        .await;
    assert_eq!(code, 202);
    s.upstream.restart().await;
    s.wait_status("opaque-1", Some(ALICE), "auth_required")
        .await;

    // Bob comes by with fresh credentials, opaque and as a JWT with a subject.
    let payload = "eyJzdWIiOiJib2IifQ"; // {"sub":"bob"}
    for auth in [
        "Bearer bob-token".to_string(),
        format!("Bearer x.{payload}.sig"),
    ] {
        let resp = s
            .http
            .get(format!("{}/echo/me", s.outpost.url()))
            .header("Authorization", &auth)
            .send()
            .await
            .expect("GET as bob");
        assert_eq!(resp.status(), 200);
    }
    // The drain re-checks waiting items at least every second and at once when credentials
    // are offered: give it two rounds.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let doc = s
        .wait_status("opaque-1", Some(ALICE), "auth_required")
        .await;
    assert_eq!(doc["attempts"], 1, "{doc}");
    let sent = s.upstream.requests_to("/apply/profile");
    assert_eq!(sent.len(), 1, "not sent with Bob's credentials");

    // The operator releases it: sent with the credentials it carries.
    let (code, _) = s
        .admin(reqwest::Method::POST, "/queue/opaque-1/retry")
        .await;
    assert_eq!(code, 200);
    s.wait_status("opaque-1", Some(ALICE), "succeeded").await;
    let sent = s.upstream.requests_to("/apply/profile");
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].header("authorization"), Some(ALICE));
}
