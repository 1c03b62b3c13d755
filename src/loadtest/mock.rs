//! The built-in upstream of `loadtest --mock-upstream ADDR`: answers a HAR's requests
//! plausibly, keeps a ledger of the mutations it applied, and goes down on cue.
//!
//! It does NOT deduplicate by `Idempotency-Key`: every copy that arrives is applied and counted,
//! so a mutation outpost sends twice shows up as `applied_twice`. An outage closes the listener
//! and drops every open connection (clients see connection refused), then binds again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use super::har::HarEntry;

/// The mock upstream's answers and ledger.
#[derive(Debug, Default)]
pub struct Mock {
    /// Recorded answers by method + path (first recording wins).
    answers: HashMap<(Method, String), (u16, String, Bytes)>,
    /// Applications by idempotency key (every copy counted).
    ledger: Mutex<HashMap<String, u64>>,
}

/// Why the mock could not start.
#[derive(Debug, thiserror::Error)]
pub enum MockError {
    /// Only loopback addresses are allowed.
    #[error("--mock-upstream {0}: only loopback addresses are allowed")]
    NotLoopback(SocketAddr),
    /// Binding failed.
    #[error("--mock-upstream {addr}: cannot listen")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Mock {
    /// A mock answering like the recorded `entries`.
    pub fn new(entries: &[HarEntry]) -> Self {
        let mut answers = HashMap::new();
        for e in entries {
            let path = e.path_and_query.clone();
            // A recorded 5xx or outpost's own 202 would make no sense from an upstream.
            if (200..500).contains(&e.status) && e.status != 202 {
                answers.entry((e.method.clone(), path)).or_insert((
                    e.status,
                    e.response_mime.clone(),
                    e.response_body.clone(),
                ));
            }
        }
        Self {
            answers,
            ledger: Mutex::new(HashMap::new()),
        }
    }

    /// Applications by idempotency key.
    pub fn ledger(&self) -> HashMap<String, u64> {
        self.ledger.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn answer(&self, method: &Method, path: &str, key: Option<&str>) -> Response<Full<Bytes>> {
        let write = matches!(
            *method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        );
        if write && let Some(key) = key {
            if let Ok(mut l) = self.ledger.lock() {
                *l.entry(key.to_owned()).or_default() += 1;
            }
        }
        let (status, mime, body) = match self.answers.get(&(method.clone(), path.to_owned())) {
            Some((s, m, b)) => (*s, m.clone(), b.clone()),
            None if write => (201, "application/json".into(), Bytes::from_static(b"{}")),
            None => (200, "application/json".into(), Bytes::from_static(b"{}")),
        };
        let mut resp = Response::new(Full::new(body));
        *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        if let Ok(v) = http::HeaderValue::from_str(if mime.is_empty() {
            "application/octet-stream"
        } else {
            &mime
        }) {
            resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
        }
        resp
    }
}

/// A running mock: up until [`MockServer::down`], up again after [`MockServer::up`].
pub struct MockServer {
    addr: SocketAddr,
    mock: Arc<Mock>,
    running: Option<CancellationToken>,
}

impl MockServer {
    /// Start serving `mock` on the loopback address `addr`.
    pub async fn start(addr: SocketAddr, mock: Arc<Mock>) -> Result<Self, MockError> {
        if !addr.ip().is_loopback() {
            return Err(MockError::NotLoopback(addr));
        }
        let mut server = Self {
            addr,
            mock,
            running: None,
        };
        server.up().await?;
        Ok(server)
    }

    /// The mock's answers and ledger.
    pub fn mock(&self) -> &Arc<Mock> {
        &self.mock
    }

    /// Bind and serve (no-op while up).
    pub async fn up(&mut self) -> Result<(), MockError> {
        if self.running.is_some() {
            return Ok(());
        }
        let listener = bind(self.addr).await.map_err(|source| MockError::Bind {
            addr: self.addr,
            source,
        })?;
        let token = CancellationToken::new();
        tokio::spawn(serve(listener, self.mock.clone(), token.clone()));
        self.running = Some(token);
        Ok(())
    }

    /// Close the listener and drop every connection.
    pub fn down(&mut self) {
        if let Some(token) = self.running.take() {
            token.cancel();
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.down();
    }
}

/// Bind, retrying briefly: the port of the listener just closed may still be held.
async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for _ in 0..50 {
        let socket = tokio::net::TcpSocket::new_v4().or_else(|_| tokio::net::TcpSocket::new_v6());
        let attempt = socket.and_then(|s| {
            s.set_reuseaddr(true)?;
            s.bind(addr)?;
            s.listen(1024)
        });
        match attempt {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("bind failed")))
}

async fn serve(listener: tokio::net::TcpListener, mock: Arc<Mock>, token: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = token.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        let mock = mock.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let mock = mock.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    // Read the whole request before applying it, as a real server would.
                    let _ = body.collect().await;
                    let key = parts
                        .headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok());
                    let path = parts
                        .uri
                        .path_and_query()
                        .map(|p| p.as_str())
                        .unwrap_or("/");
                    Ok::<_, std::convert::Infallible>(mock.answer(&parts.method, path, key))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                // An outage: the connection is dropped mid-flight.
                _ = token.cancelled() => {}
            }
        });
    }
}
