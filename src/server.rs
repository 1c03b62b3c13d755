//! Listeners and connection handling.
//!
//! The proxy runs thread-per-core: `proxy.workers` threads (default: one per core), each with a
//! single-threaded tokio runtime, its own listener socket on the shared address
//! (`SO_REUSEPORT`: the kernel spreads connections) and its own upstream connection pool. A
//! request is read, forwarded and answered on one thread, with no hand-off between threads;
//! shared state (cache, store, health, events) is thread-safe. Background work (probe,
//! replay, admin) runs on the main runtime.
//!
//! One accept loop per listener; each connection is served by hyper-util's auto builder
//! (HTTP/1.1 with upgrades, and h2c by preface; with TLS, h2 or http/1.1 by ALPN). The request
//! head is bounded (`proxy.max_header_bytes` → 431) and must arrive within
//! `proxy.header_read_timeout`. On shutdown the listener closes, open connections are asked to
//! finish gracefully, and whatever is still open after `proxy.shutdown_grace` is dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::config::ProxyConfig;
use crate::proxy::Proxy;
use crate::proxy::forward::ClientInfo;
use crate::shutdown::Shutdown;
use crate::stack;

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
        let handle = std::thread::Builder::new()
            .name(format!("outpost-proxy-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => serve(listener, tls, proxy, config, shutdown).await,
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
    config: ProxyConfig,
    shutdown: Shutdown,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        let max_head = config.max_header_bytes;
        let max_body = config.max_body_bytes;
        tracker.spawn(async move {
            let client = ClientInfo::new(peer.ip(), if tls.is_some() { "https" } else { "http" });
            let service =
                TowerToHyperService::new(stack::proxy_service(proxy, client, max_head, max_body));
            match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls_stream) => {
                        serve_connection(
                            &builder,
                            TokioIo::new(tls_stream),
                            service,
                            &shutdown,
                            peer,
                        )
                        .await
                    }
                    Err(e) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                },
                None => {
                    serve_connection(&builder, TokioIo::new(stream), service, &shutdown, peer).await
                }
            }
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace elapsed with connections still open; closing them");
    }
}

async fn serve_connection<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    shutdown: &Shutdown,
    peer: SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<crate::body::ProxyBody>,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        }
        _ = shutdown.wait() => {
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "connection ended during shutdown: {e}");
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
