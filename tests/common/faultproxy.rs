//! A fault-injecting TCP proxy on loopback, between outpost and the test [`Upstream`].
//!
//! [`FaultProxy`] listens on its own port and forwards each HTTP/1.1 exchange to the upstream
//! on a connection of its own (it adds `Connection: close` to the request head, so every
//! connection carries exactly one exchange and a fault hits exactly one request). What it does
//! with the next exchange is the current [`Fault`], switchable at any moment with
//! [`FaultProxy::set`]; [`FaultProxy::flap`] switches between passing and refusing by itself.
//!
//! For the exactly-once ledger it reads the `Idempotency-Key` of each request it forwards and
//! remembers the keys whose answer it kept from outpost ([`FaultProxy::eaten`]): the upstream
//! may have applied such a request, so outpost sending it again is a re-delivery the contract
//! allows, not a double.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// What the proxy does with an exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward the request and relay the answer untouched.
    Pass,
    /// Nothing listens: connections are refused (the listener is closed).
    Refuse,
    /// Read the request head, then reset the connection (RST); nothing is forwarded.
    ResetRequest,
    /// Forward the request, relay the first bytes of the answer's head, then reset (RST).
    ResetResponse,
    /// Forward the request, never relay a byte of the answer (the connection stays open).
    NoResponseHead,
    /// Forward the request, relay the answer's head and a few body bytes, then hold the
    /// connection open without sending more.
    StallBody,
    /// Forward the request, relay the answer's head and a few body bytes, then close (FIN).
    TruncateBody,
    /// Forward the request, relay the answer `bytes` at a time, pausing `every` in between.
    Trickle {
        /// Bytes per piece.
        bytes: usize,
        /// Pause between pieces.
        every: Duration,
    },
    /// Answer every request itself with `status` (and `Retry-After: {retry_after}` if set),
    /// nothing forwarded: a 5xx storm, or a 429/503 storm with `Retry-After`.
    Status {
        /// The status code.
        status: u16,
        /// Seconds for `Retry-After`, if any.
        retry_after: Option<u32>,
    },
    /// Forward the request and relay the answer after the given delay (a very slow upstream).
    Delay(Duration),
}

impl Fault {
    /// A short name for reports.
    pub fn name(&self) -> String {
        match self {
            Fault::Pass => "pass".into(),
            Fault::Refuse => "refused connections".into(),
            Fault::ResetRequest => "reset mid-request".into(),
            Fault::ResetResponse => "reset mid-response".into(),
            Fault::NoResponseHead => "response head never comes".into(),
            Fault::StallBody => "body stalls".into(),
            Fault::TruncateBody => "body truncated".into(),
            Fault::Trickle { .. } => "slow trickle".into(),
            Fault::Status {
                status,
                retry_after: Some(_),
            } => format!("{status} storm with Retry-After"),
            Fault::Status { status, .. } => format!("{status} storm"),
            Fault::Delay(_) => "very slow upstream".into(),
        }
    }
}

#[derive(Default)]
struct Shared {
    fault: Mutex<Option<Fault>>,
    /// Keys whose answer outpost did not get whole, with how often.
    eaten: Mutex<HashMap<String, usize>>,
    /// Exchanges seen, per fault name.
    exchanges: Mutex<HashMap<String, u64>>,
    accepted: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fault-injecting proxy (see the module docs). Dropping it stops it.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    accept: Mutex<Option<JoinHandle<()>>>,
    flapping: Mutex<Option<JoinHandle<()>>>,
    closed: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port in front of `upstream`, passing everything.
    pub async fn start(upstream: SocketAddr) -> Arc<FaultProxy> {
        let (listener, addr) = loop {
            let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .expect("bind the fault proxy");
            let addr = listener.local_addr().expect("fault proxy local_addr");
            if super::claim_port(addr.port()) {
                break (listener, addr);
            }
        };
        let proxy = Arc::new(FaultProxy {
            addr,
            upstream,
            shared: Arc::new(Shared {
                fault: Mutex::new(Some(Fault::Pass)),
                ..Shared::default()
            }),
            accept: Mutex::new(None),
            flapping: Mutex::new(None),
            closed: Arc::new(AtomicBool::new(false)),
        });
        proxy.serve(listener);
        proxy
    }

    /// `http://127.0.0.1:PORT`: give this to outpost as its upstream.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn serve(&self, listener: TcpListener) {
        let (shared, upstream) = (self.shared.clone(), self.upstream);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let _ = client.set_nodelay(true);
                tokio::spawn(exchange(client, upstream, shared.clone()));
            }
        });
        *lock(&self.accept) = Some(task);
    }

    /// Switches to `fault` for every exchange from now on (stops flapping).
    pub async fn set(&self, fault: Fault) {
        if let Some(task) = lock(&self.flapping).take() {
            task.abort();
        }
        self.switch(fault).await;
    }

    async fn switch(&self, fault: Fault) {
        let refuse = fault == Fault::Refuse;
        *lock(&self.shared.fault) = Some(fault);
        let running = lock(&self.accept).is_some();
        if refuse && running {
            let task = lock(&self.accept).take();
            if let Some(task) = task {
                task.abort();
                let _ = task.await;
            }
        } else if !refuse && !running && !self.closed.load(Ordering::SeqCst) {
            let listener = loop {
                match bind(self.addr).await {
                    Ok(l) => break l,
                    Err(e) => {
                        eprintln!("fault proxy: bind {} again: {e}; retrying", self.addr);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            };
            self.serve(listener);
        }
    }

    /// Alternates between [`Fault::Refuse`] and [`Fault::Pass`] every `period`, starting
    /// with refusing, until [`FaultProxy::set`] is called.
    pub async fn flap(self: &Arc<Self>, period: Duration) {
        self.set(Fault::Refuse).await;
        let proxy = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            let mut up = false;
            loop {
                tokio::time::sleep(period).await;
                let Some(proxy) = proxy.upgrade() else { return };
                up = !up;
                proxy
                    .switch(if up { Fault::Pass } else { Fault::Refuse })
                    .await;
            }
        });
        *lock(&self.flapping) = Some(task);
    }

    /// The current fault.
    pub fn fault(&self) -> Fault {
        lock(&self.shared.fault).clone().unwrap_or(Fault::Pass)
    }

    /// Keys whose answer outpost did not get whole (reset, stalled, truncated, or outpost gave
    /// up before it came), with how often.
    pub fn eaten(&self) -> HashMap<String, usize> {
        lock(&self.shared.eaten).clone()
    }

    /// Exchanges handled per fault name (see [`Fault::name`]).
    pub fn exchanges(&self) -> HashMap<String, u64> {
        lock(&self.shared.exchanges).clone()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(task) = lock(&self.flapping).take() {
            task.abort();
        }
        if let Some(task) = lock(&self.accept).take() {
            task.abort();
        }
    }
}

/// Binds with `SO_REUSEADDR`, so that the port can be taken again at once.
async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Position just past the blank line ending an HTTP head, if `buf` holds one.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The value of header `name` (lowercase) in an HTTP head, if present.
fn header_value(head: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(head);
    text.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// Resets `stream` (RST instead of FIN).
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// One exchange on a fresh client connection.
async fn exchange(mut client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    // The request head.
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    let end = loop {
        if let Some(end) = head_end(&buf) {
            break end;
        }
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 1 << 20 {
            return;
        }
    };
    let fault = lock(&shared.fault).clone().unwrap_or(Fault::Pass);
    *lock(&shared.exchanges).entry(fault.name()).or_default() += 1;
    let key = header_value(&buf[..end], "idempotency-key");
    let eaten = |shared: &Shared| {
        if let Some(key) = &key {
            *lock(&shared.eaten).entry(key.clone()).or_default() += 1;
        }
    };

    match fault {
        Fault::Refuse | Fault::ResetRequest => {
            reset(client);
            return;
        }
        Fault::Status {
            status,
            retry_after,
        } => {
            // Read the request body, then answer and close.
            let length: usize = header_value(&buf[..end], "content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let chunked = header_value(&buf[..end], "transfer-encoding")
                .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
            loop {
                let body = &buf[end..];
                let done = if chunked {
                    body.windows(5).any(|w| w == b"0\r\n\r\n")
                } else {
                    body.len() >= length
                };
                if done {
                    break;
                }
                match client.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body = format!(r#"{{"error":"injected","status":{status}}}"#);
            let retry = retry_after
                .map(|s| format!("retry-after: {s}\r\n"))
                .unwrap_or_default();
            let answer = format!(
                "HTTP/1.1 {status} Injected\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\n{retry}connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = client.write_all(answer.as_bytes()).await;
            let _ = client.shutdown().await;
            // Let the client read the answer before the socket goes.
            let _ = tokio::time::timeout(Duration::from_secs(2), client.read(&mut chunk)).await;
            return;
        }
        _ => {}
    }

    // Forward: the head with `Connection: close` added, then the rest as it comes.
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        reset(client);
        return;
    };
    let _ = server.set_nodelay(true);
    let line_end = buf
        .windows(2)
        .position(|w| w == b"\r\n")
        .map_or(end - 2, |p| p + 2);
    let mut head = Vec::with_capacity(buf.len() + 20);
    head.extend_from_slice(&buf[..line_end]);
    head.extend_from_slice(b"connection: close\r\n");
    for line in String::from_utf8_lossy(&buf[line_end..end]).split("\r\n") {
        if !line.is_empty() && !line.to_ascii_lowercase().starts_with("connection:") {
            head.extend_from_slice(line.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
    }
    head.extend_from_slice(b"\r\n");
    head.extend_from_slice(&buf[end..]);
    if server.write_all(&head).await.is_err() {
        reset(client);
        return;
    }
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // The rest of the request; the client's end of stream means it gave up (or is done).
    let client_gone = Arc::new(AtomicBool::new(false));
    let gone = client_gone.clone();
    let request_copy = tokio::spawn(async move {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match client_read.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if server_write.write_all(&chunk[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        gone.store(true, Ordering::SeqCst);
        client_read
    });

    // The answer, as the fault has it.
    let mut relayed = 0usize;
    let mut seen = Vec::new();
    // Whether the client was still there when the last piece was written to it.
    let mut gone_before_write = false;
    let complete = loop {
        let n = match server_read.read(&mut chunk).await {
            Ok(0) => break true,
            Ok(n) => n,
            Err(_) => break false,
        };
        let piece = &chunk[..n];
        if relayed == 0 || head_end(&seen).is_none() {
            seen.extend_from_slice(piece);
        }
        gone_before_write |= client_gone.load(Ordering::SeqCst);
        match &fault {
            Fault::ResetResponse => {
                let _ = client_write.write_all(&piece[..piece.len().min(12)]).await;
                eaten(&shared);
                request_copy.abort();
                if let Ok(read) = request_copy.await
                    && let Ok(stream) = read.reunite(client_write)
                {
                    reset(stream);
                }
                return;
            }
            Fault::NoResponseHead => {
                eaten(&shared);
                // Hold until the client gives up.
                let _ = request_copy.await;
                return;
            }
            Fault::StallBody | Fault::TruncateBody => {
                relayed += n;
                let Some(head) = head_end(&seen) else {
                    continue;
                };
                let upto = (head + 3).min(seen.len());
                let _ = client_write.write_all(&seen[..upto]).await;
                eaten(&shared);
                if fault == Fault::StallBody {
                    let _ = request_copy.await;
                } else {
                    let _ = client_write.shutdown().await;
                    request_copy.abort();
                }
                return;
            }
            Fault::Trickle { bytes, every } => {
                let mut ok = true;
                for part in piece.chunks((*bytes).max(1)) {
                    gone_before_write |= client_gone.load(Ordering::SeqCst);
                    if client_write.write_all(part).await.is_err() {
                        ok = false;
                        break;
                    }
                    tokio::time::sleep(*every).await;
                }
                if !ok {
                    break false;
                }
            }
            Fault::Delay(delay) => {
                if relayed == 0 {
                    tokio::time::sleep(*delay).await;
                    gone_before_write |= client_gone.load(Ordering::SeqCst);
                }
                if client_write.write_all(piece).await.is_err() {
                    break false;
                }
            }
            _ => {
                if client_write.write_all(piece).await.is_err() {
                    break false;
                }
            }
        }
        relayed += n;
    };
    // Outpost got the whole answer only if it was all written before it went away.
    let whole = complete && relayed > 0 && !gone_before_write;
    if !whole {
        eaten(&shared);
    }
    let _ = client_write.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), request_copy).await;
}
