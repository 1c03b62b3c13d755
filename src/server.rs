//! Listeners and connection handling.
//!
//! The proxy runs thread-per-core: `proxy.workers` threads (default: one per core), each with a
//! single-threaded tokio runtime, its own listener socket on the shared address
//! (`SO_REUSEPORT`: the kernel spreads connections) and its own upstream connection pool. A
//! request is read, forwarded and answered on one thread, with no hand-off between threads;
//! shared state (cache, store, health, events) is thread-safe. The store's writer answers the
//! requests of a thread through its mailbox (`handoff`): one wake-up per commit group.
//! Background work (probe, replay, admin) runs on the main runtime.
//!
//! [`accept_loop`] serves one listener, the proxy's or the admin's, each connection with
//! hyper-util's auto builder (HTTP/1.1 with upgrades, and h2c by preface; with TLS, h2 or
//! http/1.1 by ALPN):
//! - every connection needs a slot in its listener's [`Connections`] budget (`limits`): at
//!   the limit the longest-idle connection is closed to make room, or the new one refused;
//! - its bytes pass through a [`Guard`] (`guard`) that refuses ambiguous HTTP/1 framing
//!   (400) and closes connections that send no complete request head within
//!   `proxy.header_read_timeout` (408 when part of one arrived); a TLS handshake must finish
//!   within the same time;
//! - accept errors (out of descriptors, say) back off from 5 ms to 1 s instead of spinning,
//!   with a warning at most every few seconds.
//!
//! Request heads are also bounded in size (`proxy.max_header_bytes` → 431). On shutdown the
//! listener closes, open connections are asked to finish gracefully, and whatever is still open
//! after `proxy.shutdown_grace` is dropped.

pub mod guard;
pub mod limits;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::body::BoxError;
use crate::config::ProxyConfig;
use crate::context::ClientInfo;
use crate::proxy::Proxy;
use crate::shutdown::Shutdown;
use crate::stack;
use guard::{Finished, Guard, GuardOptions};
pub use limits::{ConnectionStats, Connections};

/// A TLS set-up failure (bad certificate or key file).
#[derive(Debug, thiserror::Error)]
#[error("proxy TLS: {0}")]
pub struct TlsError(String);

/// Build the TLS acceptor for `proxy.tls_cert`/`proxy.tls_key` (ALPN h2 and http/1.1).
pub fn tls_acceptor(config: &ProxyConfig) -> Result<Option<TlsAcceptor>, TlsError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let cert_pem = std::fs::read(cert).map_err(|e| TlsError(format!("{}: {e}", cert.display())))?;
    let key_pem = std::fs::read(key).map_err(|e| TlsError(format!("{}: {e}", key.display())))?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("{}: {e}", cert.display())))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| TlsError(format!("{}: {e}", key.display())))?
        .ok_or_else(|| TlsError(format!("{}: no private key", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError(e.to_string()))?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(tls))))
}

/// Bind `n` listener sockets on one address with `SO_REUSEPORT` (port 0: the first one's port).
pub fn bind_shards(
    addr: SocketAddr,
    n: usize,
) -> Result<Vec<std::net::TcpListener>, std::io::Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut listeners: Vec<std::net::TcpListener> = Vec::with_capacity(n.max(1));
    let mut bound = addr;
    for _ in 0..n.max(1) {
        let socket = Socket::new(
            Domain::for_address(bound),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket
            .bind(&bound.into())
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        socket.listen(4096)?;
        let listener: std::net::TcpListener = socket.into();
        bound = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Serve the proxy on each listener from its own thread and single-threaded runtime, with the
/// proxy `make_proxy` builds for it (its own upstream pool). Threads end after shutdown.
pub fn spawn_shards(
    listeners: Vec<std::net::TcpListener>,
    tls: Option<TlsAcceptor>,
    mut make_proxy: impl FnMut() -> Arc<Proxy>,
    connections: &Arc<Connections>,
    config: &ProxyConfig,
    shutdown: &Shutdown,
) -> Result<Vec<std::thread::JoinHandle<()>>, std::io::Error> {
    let mut threads = Vec::with_capacity(listeners.len());
    for (i, listener) in listeners.into_iter().enumerate() {
        let proxy = make_proxy();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (tls, config, shutdown) = (tls.clone(), config.clone(), shutdown.clone());
        let connections = connections.clone();
        let handle = std::thread::Builder::new()
            .name(format!("outpost-proxy-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    // The store's answers to this thread's requests come through its mailbox.
                    let _answers = crate::handoff::serve_here();
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            serve(listener, tls, proxy, connections, config, shutdown).await
                        }
                        Err(e) => {
                            tracing::error!("proxy listener {i}: {e}");
                            shutdown.trigger();
                        }
                    }
                });
            })?;
        threads.push(handle);
    }
    Ok(threads)
}

/// Serve the proxy on `listener` until shutdown.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    proxy: Arc<Proxy>,
    connections: Arc<Connections>,
    config: ProxyConfig,
    shutdown: Shutdown,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The guard times request heads, from the first byte of a connection on, including
        // where it no longer follows the framing (`server/guard.rs`): hyper's own timer would
        // only add an allocation and a timer to every request.
        .header_read_timeout(None::<Duration>)
        .max_buf_size(config.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
    let options = ConnectionOptions {
        guard: GuardOptions {
            header_read_timeout: config.header_read_timeout,
            head_limit: config.max_header_bytes.max(8192),
        },
        shutdown_grace: config.shutdown_grace,
    };
    let proto = if tls.is_some() { "https" } else { "http" };
    let (max_head, max_body) = (config.max_header_bytes, config.max_body_bytes);
    let outbox = proxy.outbox().clone();
    let deadline = accept_loop(
        listener,
        tls,
        Arc::new(builder),
        connections,
        options,
        shutdown,
        move |peer: SocketAddr| {
            let client = ClientInfo::new(peer.ip(), proto);
            TowerToHyperService::new(stack::proxy_service(
                proxy.clone(),
                client,
                max_head,
                max_body,
            ))
        },
    )
    .await;
    // Every shard waits for all the forwards (the tracker is shared), so that none of their
    // runtimes stops while one still runs on it.
    outbox.settle(deadline).await;
}

/// How the connections of a listener are served.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionOptions {
    /// Request-head time limit and size followed by the guard.
    pub guard: GuardOptions,
    /// How long open connections may take to finish after shutdown.
    pub shutdown_grace: Duration,
}

/// The answer to a connection refused at the limit (plain HTTP only; best effort).
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
content-length: 32\r\nretry-after: 1\r\nconnection: close\r\n\r\n{\"error\":\"too_many_connections\"}";

/// Serve every connection `listener` accepts with the service `make_service` makes for its
/// peer, within the `connections` budget, until shutdown (see the module docs). Returns when
/// the shutdown grace ends (the deadline that applies to what else must end with it).
#[must_use = "the end of the shutdown grace"]
pub async fn accept_loop<F, S, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    connections: Arc<Connections>,
    options: ConnectionOptions,
    shutdown: Shutdown,
    make_service: F,
) -> tokio::time::Instant
where
    F: Fn(SocketAddr) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let tracker = TaskTracker::new();
    let mut backoff = AcceptBackoff::default();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    backoff.wait(&e).await;
                    continue;
                }
            },
        };
        backoff.reset();
        let Some(admission) = connections.admit() else {
            if tls.is_none() {
                let _ = stream.try_write(REFUSED);
            }
            continue;
        };
        let accepted = tokio::time::Instant::now();
        let made_room = admission.made_room();
        let _ = stream.set_nodelay(true);
        let service = Tracked {
            inner: make_service(peer),
            shared: admission.shared().clone(),
        };
        let (builder, tls, shutdown) = (builder.clone(), tls.clone(), shutdown.clone());
        tracker.spawn(async move {
            let shared = admission.shared().clone();
            match tls {
                Some(acceptor) => {
                    let deadline = accepted + options.guard.header_read_timeout;
                    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            let io = TokioIo::new(Guard::new(
                                tls_stream,
                                admission,
                                options.guard,
                                accepted,
                            ));
                            serve_connection(&builder, io, service, &shutdown, &shared, peer).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => {
                            admission.connections().count_timeout();
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                }
                None => {
                    let io = TokioIo::new(Guard::new(stream, admission, options.guard, accepted));
                    serve_connection(&builder, io, service, &shutdown, &shared, peer).await
                }
            }
        });
        if made_room {
            // Let the closed connection's task (maybe on this thread) give its slot back
            // before accepting more, so a burst does not run far past the limit.
            tokio::task::yield_now().await;
        }
    }
    drop(listener);
    tracker.close();
    let deadline = tokio::time::Instant::now() + options.shutdown_grace;
    if tokio::time::timeout_at(deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace elapsed with connections still open; closing them");
    }
    deadline
}

/// Exponential backoff after accept errors (from 5 ms to 1 s), warning at most every 5 s.
#[derive(Debug, Default)]
struct AcceptBackoff {
    delay: Option<Duration>,
    failures: u64,
    last_warning: Option<std::time::Instant>,
}

impl AcceptBackoff {
    async fn wait(&mut self, e: &std::io::Error) {
        self.failures += 1;
        let due = self
            .last_warning
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
        if due {
            self.last_warning = Some(std::time::Instant::now());
            tracing::warn!(
                "accept failed ({} failures in a row): {e}; backing off",
                self.failures
            );
        }
        let delay = self.delay.map_or(Duration::from_millis(5), |d| {
            (d * 2).min(Duration::from_secs(1))
        });
        self.delay = Some(delay);
        tokio::time::sleep(delay).await;
    }

    fn reset(&mut self) {
        self.delay = None;
        self.failures = 0;
    }
}

/// A connection's service, counting finished responses for its guard (see [`Finished`]).
struct Tracked<S> {
    inner: S,
    shared: Arc<guard::ConnShared>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        // Dropped with the future if it never completes, else with the body once written.
        let finished = Finished::new(self.shared.clone());
        let response = self.inner.call(req);
        let shared = self.shared.clone();
        Box::pin(async move {
            let resp = response.await?;
            if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                shared.mark_upgraded();
            }
            Ok(resp.map(|body| TrackedBody {
                body,
                _finished: finished,
            }))
        })
    }
}

/// A response body that marks its response finished when hyper drops it.
struct TrackedBody<B> {
    body: B,
    _finished: Finished,
}

impl<B: http_body::Body + Unpin> http_body::Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

async fn serve_connection<I, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    shutdown: &Shutdown,
    shared: &guard::ConnShared,
    peer: SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<TrackedBody<B>>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        }
        _ = shared.close.notified() => {
            tracing::debug!(%peer, "idle connection closed to make room for a new one");
        }
        _ = shutdown.wait() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, "connection ended during shutdown: {e}");
                    }
                }
                () = shared.between_requests() => {
                    tracing::debug!(%peer, "closed at shutdown while waiting for a request head");
                }
            }
        }
    }
}

/// Bind a listener, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}
