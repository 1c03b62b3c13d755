//! The demo's toy upstream: a tiny shop API on loopback that can be taken down and brought
//! back on the same port.
//!
//! - `GET /products` → 200, a JSON list (cacheable for 5 s).
//! - `POST /orders` → 201 and the order, applied once per `Idempotency-Key` (a repeated key
//!   gets the stored answer); `{"qty": 0}` → 422; an order for product 9 → 409 (sold out).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{self, ProxyBody};

/// Orders the toy upstream applied, by idempotency key, in order.
#[derive(Default)]
pub struct Ledger {
    /// (key, order JSON) in the order applied.
    pub applied: Vec<(String, serde_json::Value)>,
    answers: HashMap<String, (u16, String)>,
    /// Requests that repeated a key already applied.
    pub duplicates_refused: usize,
    /// `PATCH /drafts/1` (an autosaving editor's draft): the draft, and the PATCHes received.
    pub draft: serde_json::Value,
    /// How many `PATCH /drafts/1` arrived.
    pub draft_writes: usize,
}

/// A toy upstream that can be stopped and started on one port.
pub struct ToyUpstream {
    addr: SocketAddr,
    ledger: Arc<Mutex<Ledger>>,
    running: Mutex<Option<CancellationToken>>,
}

impl ToyUpstream {
    /// Bind a free loopback port and start serving.
    pub async fn start() -> std::io::Result<Arc<Self>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let this = Arc::new(Self {
            addr: listener.local_addr()?,
            ledger: Arc::default(),
            running: Mutex::new(None),
        });
        this.serve(listener);
        Ok(this)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it applied.
    pub fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take it down: close the listener and every open connection.
    pub fn stop(&self) {
        if let Some(token) = self.running.lock().ok().and_then(|mut r| r.take()) {
            token.cancel();
        }
    }

    /// Bring it back on the same port.
    pub async fn restart(self: &Arc<Self>) -> std::io::Result<()> {
        let listener = TcpListener::bind(self.addr).await?;
        self.serve(listener);
        Ok(())
    }

    fn serve(self: &Arc<Self>, listener: TcpListener) {
        let token = CancellationToken::new();
        if let Ok(mut r) = self.running.lock() {
            *r = Some(token.clone());
        }
        let ledger = self.ledger.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = token.cancelled() => return,
                    s = listener.accept() => match s { Ok((s, _)) => s, Err(_) => continue },
                };
                let ledger = ledger.clone();
                let token = token.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let ledger = ledger.clone();
                        async move { Ok::<_, Infallible>(handle(req, &ledger).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    tokio::select! {
                        _ = builder.serve_connection(TokioIo::new(stream), service) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

async fn handle(req: Request<Incoming>, ledger: &Mutex<Ledger>) -> Response<ProxyBody> {
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/products") => {
            let mut resp = json(
                StatusCode::OK,
                &serde_json::json!([
                    {"id": 1, "name": "water filter", "stock": 12},
                    {"id": 2, "name": "solar lamp", "stock": 4},
                    {"id": 9, "name": "satellite phone", "stock": 0},
                ]),
            );
            resp.headers_mut().insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("max-age=5"),
            );
            resp
        }
        (Method::PATCH, "/drafts/1") => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_else(|_| Bytes::new());
            let Ok(patch) = serde_json::from_slice::<serde_json::Value>(&body) else {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "not JSON"}),
                );
            };
            let mut ledger = ledger.lock().unwrap_or_else(|p| p.into_inner());
            ledger.draft_writes += 1;
            crate::overlay::merge_patch(&mut ledger.draft, &patch);
            json(StatusCode::OK, &ledger.draft)
        }
        (Method::POST, "/orders") => {
            let key = req
                .headers()
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_else(|_| Bytes::new());
            let Some(key) = key else {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "no key"}),
                );
            };
            let mut ledger = ledger.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((status, body)) = ledger.answers.get(&key).cloned() {
                ledger.duplicates_refused += 1;
                let mut resp = Response::new(body::full(body));
                *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                return resp;
            }
            let order: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let (status, answer) = if order.get("qty").and_then(|q| q.as_u64()) == Some(0) {
                (
                    422,
                    serde_json::json!({"errors": [{"message": "qty must be at least 1"}]}),
                )
            } else if order.get("product").and_then(|p| p.as_u64()) == Some(9) {
                (409, serde_json::json!({"error": "sold out"}))
            } else {
                let id = ledger.applied.len() + 1;
                ledger.applied.push((key.clone(), order.clone()));
                (201, serde_json::json!({"id": id, "order": order}))
            };
            ledger.answers.insert(key, (status, answer.to_string()));
            json(
                StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
                &answer,
            )
        }
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not found"}),
        ),
    }
}
