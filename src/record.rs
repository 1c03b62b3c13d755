//! Recording traffic as HAR 1.2 (`serve --record FILE.har`, `proxy.record_har`).
//!
//! Recording never slows the data path: the proxy tees request and response bodies (up to
//! `proxy.record_max_body_bytes`, the rest is streamed but not kept, and the entry is marked
//! `_truncated`) and hands the finished entry to a bounded channel; when the writer task lags,
//! the entry is dropped and counted (`/status` `record_dropped`) instead of blocking.
//!
//! The file is written so that a crash leaves something loadable: the head
//! `{"log":{…,"entries":[` first, then one entry per line (each after the first preceded by a
//! comma), each line flushed as it is written; the closing `]}}` on shutdown. The HAR loader
//! (`loadtest::har`) repairs a file cut anywhere.
//!
//! `Authorization`, `Proxy-Authorization`, `Cookie`, `Set-Cookie` and the headers named in
//! `proxy.record_redact_headers` are written as `"[redacted]"`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::body::{BoxError, ProxyBody};
use crate::context::Source;
use crate::shutdown::Shutdown;

/// How many finished entries may wait for the writer before new ones are dropped.
const CHANNEL_CAPACITY: usize = 4096;

/// Headers always redacted.
const ALWAYS_REDACTED: [&str; 4] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

/// The value written for a redacted header.
pub const REDACTED: &str = "[redacted]";

/// The recording side the proxy sees: cheap to clone, never blocks.
#[derive(Debug)]
pub struct Recorder {
    tx: mpsc::Sender<Value>,
    dropped: AtomicU64,
    max_body: u64,
    redact: Vec<String>,
}

/// What a recording could not do at start.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The HAR file could not be created or written.
    #[error("cannot write the HAR file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Recorder {
    /// Create `path` (truncating it), write the HAR head, and return the recorder and the
    /// writer task, which runs until `shutdown`, records what finishes within `grace` after
    /// it (the requests the proxy is still answering), and then closes the file.
    pub fn start(
        path: &Path,
        max_body: u64,
        redact: &[String],
        shutdown: Shutdown,
        grace: Duration,
    ) -> Result<
        (
            Arc<Recorder>,
            impl std::future::Future<Output = ()> + Send + 'static,
        ),
        RecordError,
    > {
        let io = |source| RecordError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::File::create(path).map_err(io)?;
        let head = json!({"version": "1.2", "creator": {"name": "outpost", "version": env!("CARGO_PKG_VERSION")}});
        let head = head.to_string();
        // `{"version":…,"creator":{…}}` → `{"log":{"version":…,"creator":{…},"entries":[`
        let inner = head.strip_suffix('}').unwrap_or(&head);
        writeln!(file, "{{\"log\":{inner},\"entries\":[").map_err(io)?;
        file.flush().map_err(io)?;
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let recorder = Arc::new(Recorder {
            tx,
            dropped: AtomicU64::new(0),
            max_body,
            redact: redact.iter().map(|h| h.to_ascii_lowercase()).collect(),
        });
        let path = path.to_owned();
        Ok((recorder, write_entries(file, path, rx, shutdown, grace)))
    }

    /// Entries dropped because the writer lagged.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Start recording a request: note its head, tee its body. Call [`Recorder::finish`] with
    /// the answer.
    pub fn begin(&self, req: Request<ProxyBody>) -> (Request<ProxyBody>, PendingEntry) {
        let (parts, body) = req.into_parts();
        let slot = Arc::new(Mutex::new(None));
        let slot2 = slot.clone();
        let body = capture(body, self.max_body, move |bytes, truncated| {
            if let Ok(mut s) = slot2.lock() {
                *s = Some((bytes, truncated));
            }
        });
        let url = format!(
            "http://{}{}",
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| parts.uri.authority().map(|a| a.as_str()))
                .unwrap_or("localhost"),
            parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
        );
        let pending = PendingEntry {
            started_at: time::OffsetDateTime::now_utc(),
            started: Instant::now(),
            method: parts.method.to_string(),
            url,
            version: format!("{:?}", parts.version),
            headers: self.headers(&parts.headers),
            mime: header_str(&parts.headers, "content-type"),
            body: slot,
        };
        (Request::from_parts(parts, body), pending)
    }

    /// Finish an entry: tee the response body; the entry is queued for the writer when the
    /// response body ends (or is dropped).
    pub fn finish(
        self: &Arc<Self>,
        pending: PendingEntry,
        resp: Response<ProxyBody>,
        source: Source,
    ) -> Response<ProxyBody> {
        let (parts, body) = resp.into_parts();
        let wait_ms = pending.started.elapsed().as_secs_f64() * 1000.0;
        let status = parts.status.as_u16();
        let headers = self.headers(&parts.headers);
        let mime = header_str(&parts.headers, "content-type");
        let cache_status = header_str(&parts.headers, "cache-status");
        let version = format!("{:?}", parts.version);
        let reason = parts.status.canonical_reason().unwrap_or("").to_owned();
        let recorder = self.clone();
        let body = capture(body, self.max_body, move |bytes, truncated| {
            let total_ms = pending.started.elapsed().as_secs_f64() * 1000.0;
            let (req_body, req_truncated) = pending
                .body
                .lock()
                .ok()
                .and_then(|mut s| s.take())
                .unwrap_or_default();
            let mut request = json!({
                "method": pending.method,
                "url": pending.url,
                "httpVersion": pending.version,
                "cookies": [],
                "headers": pending.headers,
                "queryString": [],
                "headersSize": -1,
                "bodySize": req_body.len(),
            });
            if !req_body.is_empty() {
                let mut post = content_json(&req_body, &pending.mime, req_truncated);
                post["mimeType"] = json!(pending.mime);
                request["postData"] = post;
            }
            let mut content = content_json(&bytes, &mime, truncated);
            content["size"] = json!(bytes.len());
            content["mimeType"] = json!(mime);
            let started = pending
                .started_at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            let entry = json!({
                "startedDateTime": started,
                "time": total_ms,
                "request": request,
                "response": {
                    "status": status,
                    "statusText": reason,
                    "httpVersion": version,
                    "cookies": [],
                    "headers": headers,
                    "content": content,
                    "redirectURL": "",
                    "headersSize": -1,
                    "bodySize": bytes.len(),
                },
                "cache": {},
                "timings": {"send": 0, "wait": wait_ms, "receive": (total_ms - wait_ms).max(0.0)},
                "_outpost": {"source": source.as_str(), "cache_status": cache_status},
            });
            recorder.offer(entry);
        });
        Response::from_parts(parts, body)
    }

    fn offer(&self, entry: Value) {
        if self.tx.try_send(entry).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn headers(&self, headers: &HeaderMap) -> Value {
        let list: Vec<Value> = headers
            .iter()
            .map(|(name, value)| {
                let n = name.as_str();
                let value = if ALWAYS_REDACTED.contains(&n) || self.redact.iter().any(|r| r == n) {
                    REDACTED.to_owned()
                } else {
                    String::from_utf8_lossy(value.as_bytes()).into_owned()
                };
                json!({"name": n, "value": value})
            })
            .collect();
        Value::Array(list)
    }
}

/// A request whose answer is not known yet.
#[derive(Debug)]
pub struct PendingEntry {
    started_at: time::OffsetDateTime,
    started: Instant,
    method: String,
    url: String,
    version: String,
    headers: Value,
    mime: String,
    body: Arc<Mutex<Option<(Bytes, bool)>>>,
}

fn header_str(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// `{"text": …}` (base64 with `"encoding": "base64"` when not UTF-8), `_truncated` when cut.
fn content_json(bytes: &Bytes, _mime: &str, truncated: bool) -> Value {
    let mut v = match std::str::from_utf8(bytes) {
        Ok(text) => json!({"text": text}),
        Err(_) => json!({
            "text": base64::engine::general_purpose::STANDARD.encode(bytes),
            "encoding": "base64",
        }),
    };
    if truncated {
        v["_truncated"] = json!(true);
    }
    v
}

async fn write_entries(
    file: std::fs::File,
    path: PathBuf,
    mut rx: mpsc::Receiver<Value>,
    shutdown: Shutdown,
    grace: Duration,
) {
    let mut out = std::io::BufWriter::new(file);
    let mut first = true;
    let mut write = |out: &mut std::io::BufWriter<std::fs::File>, entry: Value| {
        let sep = if first { "" } else { ",\n" };
        first = false;
        write!(out, "{sep}{entry}")
    };
    loop {
        tokio::select! {
            entry = rx.recv() => {
                let Some(entry) = entry else { break };
                let mut res = write(&mut out, entry);
                while let Ok(more) = rx.try_recv() {
                    res = res.and_then(|()| write(&mut out, more));
                }
                if let Err(e) = res.and_then(|()| out.flush()) {
                    tracing::error!(path = %path.display(), "HAR recording stopped: {e}");
                    return;
                }
            }
            _ = shutdown.wait() => break,
        }
    }
    // Requests still running in the shutdown grace are recorded as they finish: keep writing
    // until every sender is gone (the proxies have stopped) or the grace is over.
    let mut res = Ok(());
    let deadline = tokio::time::Instant::now() + grace;
    while res.is_ok() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(entry)) => res = write(&mut out, entry).and_then(|()| out.flush()),
            Ok(None) | Err(_) => break,
        }
    }
    while let Ok(more) = rx.try_recv() {
        res = res.and_then(|()| write(&mut out, more));
    }
    if let Err(e) = res
        .and_then(|()| writeln!(out, "\n]}}}}"))
        .and_then(|()| out.flush())
    {
        tracing::error!(path = %path.display(), "HAR recording not closed: {e}");
    }
}

/// A body that streams `inner` through unchanged, keeping its first `limit` bytes; when it
/// ends (or is dropped) `done` gets them and whether more went by.
fn capture(
    inner: ProxyBody,
    limit: u64,
    done: impl FnOnce(Bytes, bool) + Send + 'static,
) -> ProxyBody {
    use http_body_util::BodyExt;
    Capture {
        inner,
        buf: BytesMut::new(),
        limit,
        truncated: false,
        done: Some(Box::new(done)),
    }
    .boxed_unsync()
}

type Done = Box<dyn FnOnce(Bytes, bool) + Send>;

struct Capture {
    inner: ProxyBody,
    buf: BytesMut,
    limit: u64,
    truncated: bool,
    done: Option<Done>,
}

impl Capture {
    fn complete(&mut self) {
        if let Some(done) = self.done.take() {
            done(std::mem::take(&mut self.buf).freeze(), self.truncated);
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.complete();
    }
}

impl http_body::Body for Capture {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let room = this.limit.saturating_sub(this.buf.len() as u64) as usize;
                    if data.len() > room {
                        this.truncated = true;
                    }
                    this.buf.extend_from_slice(&data[..data.len().min(room)]);
                }
                if this.inner.is_end_stream() {
                    this.complete();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.complete();
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn capture_keeps_the_limit_and_marks_truncation() {
        let seen = Arc::new(Mutex::new(None));
        let s = seen.clone();
        let body = capture(crate::body::full("hello world"), 5, move |b, t| {
            *s.lock().expect("lock") = Some((b, t));
        });
        let all = body.collect().await.expect("body").to_bytes();
        assert_eq!(all, Bytes::from_static(b"hello world"));
        let got = seen.lock().expect("lock").clone();
        assert_eq!(got, Some((Bytes::from_static(b"hello"), true)));
    }
}
