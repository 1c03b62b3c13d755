//! The lean HTTP/1.1 client for plain `http://` upstreams: hyper's connection-level client
//! (`hyper::client::conn::http1`) over a small keep-alive pool of its own.
//!
//! Each proxy thread has its own pool ([`super::Upstream::with_own_pool`]), so the pool's
//! lock is never contended. Idle connections form a stack: the most recently used one is
//! taken first (its socket and buffers are warm), the oldest ones sit at the bottom, where
//! they expire after `upstream.pool_idle_timeout`; at most `upstream.pool_max_idle` are kept.
//! A connection goes back to the pool when its answer's body has been read to the end (see
//! [`UpstreamBody`]); one whose body was dropped half-read, or that was upgraded, is not
//! reused (hyper closes it).
//!
//! What this keeps exact is whether a request may have reached the upstream: hyper hands back
//! a request it never wrote (a pooled connection that closed while idle, say). Such a
//! request is sent again on another connection, and if even a fresh connection refuses it
//! unwritten, the failure is a [`ForwardError::Connect`] (certainly not sent), never an
//! ambiguous one.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use super::{ForwardError, TransportError};
use crate::body::ProxyBody;

/// A keep-alive pool of HTTP/1.1 connections to one upstream.
pub(super) struct Pool {
    idle: Mutex<Vec<Idle>>,
    host: String,
    port: u16,
    connect_timeout: Duration,
    request_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
}

struct Idle {
    sender: SendRequest<ProxyBody>,
    since: Instant,
}

impl Pool {
    /// An empty pool for `host:port` (an IPv6 literal may keep its brackets).
    pub(super) fn new(
        host: &str,
        port: u16,
        connect_timeout: Duration,
        request_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            connect_timeout,
            request_timeout,
            idle_timeout,
            max_idle,
        }
    }

    /// The most recently used idle connection that is still open, dropping expired ones.
    fn checkout(&self) -> Option<SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(top) = idle.pop() {
            if top.since.elapsed() > self.idle_timeout {
                // Everything below is older still.
                idle.clear();
                return None;
            }
            if !top.sender.is_closed() {
                return Some(top.sender);
            }
        }
        None
    }

    /// Give a connection back (when its last answer was read to the end).
    fn checkin(&self, sender: SendRequest<ProxyBody>) {
        if sender.is_closed() || self.max_idle == 0 {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() >= self.max_idle {
            // The oldest makes room.
            idle.remove(0);
        }
        idle.push(Idle {
            sender,
            since: Instant::now(),
        });
    }

    /// A new connection, its I/O driven by a task of the current runtime.
    async fn connect(&self) -> Result<SendRequest<ProxyBody>, ForwardError> {
        let connect = tokio::net::TcpStream::connect((self.host.as_str(), self.port));
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(ForwardError::Connect(Box::new(e))),
            Err(_) => {
                return Err(ForwardError::Connect(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect timed out after {:?}", self.connect_timeout),
                ))));
            }
        };
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ForwardError::Connect(Box::new(e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("upstream connection ended: {e}");
            }
        });
        Ok(sender)
    }

    /// Send `req` (origin-form URI, `Host` set) on a pooled or new connection. The response
    /// head must come within the request timeout, counted from the moment the connection is
    /// ready: a connect that stalls is a [`ForwardError::Connect`] (after the connect
    /// timeout), never a [`ForwardError::Timeout`] of a request that may have been applied.
    pub(super) async fn send(
        self: &Arc<Self>,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, ForwardError> {
        loop {
            let (mut sender, fresh) = match self.checkout() {
                Some(sender) => (sender, false),
                // Boxed: a new connection is the rare case, and its future (connect and
                // handshake) would otherwise enlarge every request's.
                None => (Box::pin(self.connect()).await?, true),
            };
            if let Err(e) = sender.ready().await {
                if fresh {
                    return Err(ForwardError::Connect(Box::new(e)));
                }
                continue;
            }
            let sent =
                tokio::time::timeout(self.request_timeout, sender.try_send_request(req)).await;
            let Ok(sent) = sent else {
                return Err(ForwardError::Timeout(self.request_timeout));
            };
            match sent {
                Ok(resp) => {
                    let reusable = resp.status() != http::StatusCode::SWITCHING_PROTOCOLS;
                    let pooled = reusable.then(|| (sender, self.clone()));
                    return Ok(resp.map(|inner| UpstreamBody { inner, pooled }));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: another connection may take it, a new one if need be.
                    Some(unsent) if !fresh => req = unsent,
                    Some(_) => return Err(ForwardError::Connect(Box::new(e.into_error()))),
                    None => {
                        return Err(ForwardError::Transport(TransportError::of(Box::new(
                            e.into_error(),
                        ))));
                    }
                },
            }
        }
    }
}

/// An upstream answer's body. From the lean HTTP/1 client it carries its connection, which
/// goes back to the pool once the body has been read to the end.
pub struct UpstreamBody {
    inner: Incoming,
    pooled: Option<(SendRequest<ProxyBody>, Arc<Pool>)>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pooled", &self.pooled.is_some())
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    /// A body of the legacy (TLS / HTTP/2) client: its pool is hyper-util's.
    pub(super) fn unpooled(inner: Incoming) -> Self {
        Self {
            inner,
            pooled: None,
        }
    }

    fn release(&mut self) {
        if let Some((sender, pool)) = self.pooled.take() {
            pool.checkin(sender);
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            None => this.release(),
            Some(Ok(_)) if this.inner.is_end_stream() => this.release(),
            Some(Ok(_)) => {}
            // A broken answer: hyper closes the connection.
            Some(Err(_)) => this.pooled = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // An answer without a body (HEAD, 204, 304) is complete without being read.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;

    use super::*;

    /// A loopback HTTP/1.1 server answering `ok` on keep-alive connections, counting the
    /// connections it accepted and the requests it answered.
    async fn server() -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (conns, reqs) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (c, r) = (conns.clone(), reqs.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        r.fetch_add(1, Ordering::SeqCst);
                        async {
                            Ok::<_, std::convert::Infallible>(Response::new(
                                http_body_util::Full::new(Bytes::from_static(b"ok")),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (port, conns, reqs)
    }

    fn get(port: u16) -> Request<ProxyBody> {
        let mut req = Request::new(crate::body::empty());
        *req.uri_mut() = http::Uri::from_static("/x");
        req.headers_mut().insert(
            http::header::HOST,
            http::HeaderValue::from_str(&format!("127.0.0.1:{port}")).expect("host"),
        );
        req
    }

    async fn read(pool: &Arc<Pool>, port: u16) -> Bytes {
        let resp = pool.send(get(port)).await.expect("answered");
        resp.into_body().collect().await.expect("body").to_bytes()
    }

    #[tokio::test]
    async fn a_connection_whose_answer_was_read_is_used_again() {
        let (port, conns, reqs) = server().await;
        let pool = Arc::new(Pool::new(
            "127.0.0.1",
            port,
            Duration::from_secs(1),
            Duration::from_secs(10),
            Duration::from_secs(60),
            8,
        ));
        for _ in 0..5 {
            assert_eq!(read(&pool, port).await, "ok");
        }
        assert_eq!(reqs.load(Ordering::SeqCst), 5);
        assert_eq!(conns.load(Ordering::SeqCst), 1, "one keep-alive connection");
    }

    #[tokio::test]
    async fn idle_connections_past_the_timeout_or_over_the_limit_are_not_kept() {
        let (port, conns, _) = server().await;
        let expiring = Arc::new(Pool::new(
            "127.0.0.1",
            port,
            Duration::from_secs(1),
            Duration::from_secs(10),
            Duration::ZERO,
            8,
        ));
        read(&expiring, port).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        read(&expiring, port).await;
        assert_eq!(conns.load(Ordering::SeqCst), 2, "the idle one expired");

        let none_idle = Arc::new(Pool::new(
            "127.0.0.1",
            port,
            Duration::from_secs(1),
            Duration::from_secs(10),
            Duration::from_secs(60),
            0,
        ));
        read(&none_idle, port).await;
        read(&none_idle, port).await;
        assert_eq!(
            conns.load(Ordering::SeqCst),
            4,
            "pool_max_idle = 0 keeps none"
        );
    }

    #[tokio::test]
    async fn a_body_dropped_half_read_does_not_return_its_connection() {
        let (port, conns, _) = server().await;
        let pool = Arc::new(Pool::new(
            "127.0.0.1",
            port,
            Duration::from_secs(1),
            Duration::from_secs(10),
            Duration::from_secs(60),
            8,
        ));
        let resp = pool.send(get(port)).await.expect("answered");
        // Dropped unread: ended or not, the connection is only reused if it is whole.
        drop(resp);
        read(&pool, port).await;
        read(&pool, port).await;
        assert_eq!(
            conns.load(Ordering::SeqCst),
            2,
            "the unread one was closed, the next one reused"
        );
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error_certainly_not_sent() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let pool = Arc::new(Pool::new(
            "127.0.0.1",
            port,
            Duration::from_secs(1),
            Duration::from_secs(10),
            Duration::from_secs(60),
            8,
        ));
        let err = pool.send(get(port)).await.expect_err("refused");
        assert!(matches!(err, ForwardError::Connect(_)));
        assert!(!err.may_have_been_sent());
    }
}
