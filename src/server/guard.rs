//! The connection guard: an I/O wrapper between a client's socket (or TLS stream) and hyper that
//! reads every HTTP/1 request head before hyper does.
//!
//! hyper resolves ambiguous framing on its own terms (Transfer-Encoding wins over
//! Content-Length, equal duplicate Content-Lengths are merged) and hides the evidence from the
//! service, and its header-read timeout neither covers the first bytes of a connection (the
//! HTTP/2 preface sniffing comes first) nor answers 408. So the guard follows the byte stream
//! itself, message by message:
//! - **Framing** (like nginx): a head with `Content-Length` and `Transfer-Encoding`, with two
//!   `Content-Length` values (even equal; two lines or a list in one), with two `Host` lines, or an HTTP/1.1 head without
//!   `Host`, or a head with a line ending in a bare LF (where parsers disagree on where a header
//!   begins) is answered `400` with a JSON error and the connection is closed; hyper never sees
//!   it. Bodies are skipped by their `Content-Length` or chunked framing (the same state
//!   machine as hyper's decoder) to find the next head. Anything hyper itself refuses (bad
//!   syntax, oversized heads) is left to hyper, and the guard stops reading along.
//! - **Time to a complete head**: while the connection waits for a request head with nothing
//!   in flight — from accept, and from the end of each response — a complete head must arrive
//!   within `proxy.header_read_timeout`. When it does not, a connection that sent part of a
//!   head gets `408` and is closed; one that sent nothing is closed silently. This is the only
//!   header timer (hyper's own is off: it cost an allocation and a timer per request): where
//!   the guard stops following the framing and HTTP/1 goes on (a head or body framing hyper
//!   refuses, bytes sent ahead of the answer to an upgrade request that is then refused), it
//!   still closes a connection that sends no new request within the timeout of its last
//!   answer.
//! - **Idleness** is published in [`ConnShared`] so that the connection limit can close the
//!   longest-idle connection to make room (`server::limits`), and so is waiting for an HTTP/1
//!   head with nothing in flight, so that a graceful shutdown closes such a connection at once
//!   instead of waiting for a head that a slow client may still be sending.
//!
//! An answer of the guard's own is written only when hyper has nothing in flight on the
//! connection (every request head it was given has been answered and its writes flushed), so it
//! never interleaves with a response. After an HTTP/2 preface, or an upgrade request that was
//! answered 101, the stream is passed through untouched (an upgrade answered otherwise goes on
//! as HTTP/1). The guard owns the connection's slot in its budget, so an upgraded connection
//! holds it until the socket closes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use super::limits::{Admission, Connections};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Most header lines a head may have (hyper's default; more is hyper's 431).
const MAX_HEADERS: usize = 100;

/// What one connection's guard, its service wrapper and the connection limit share.
#[derive(Debug)]
pub struct ConnShared {
    /// Request heads handed to hyper.
    heads: AtomicU64,
    /// Requests hyper handed to the service (counted whether or not the guard followed their
    /// heads).
    started: AtomicU64,
    /// Responses finished (their body dropped by hyper) or abandoned.
    done: AtomicU64,
    /// A response finished since hyper last flushed: its last bytes may still be in hyper's
    /// own buffer (hyper drops a body before it writes the bytes that end it, and drains its
    /// buffer before it flushes the connection).
    needs_flush: AtomicBool,
    /// Waiting for a request head, none of its bytes received, nothing in flight.
    idle: AtomicBool,
    /// Waiting for an HTTP/1 request head (some of its bytes may have come), nothing in
    /// flight: closing the connection cuts no request (see [`ConnShared::between_requests`]).
    awaiting_head: AtomicBool,
    /// When the current idle period began (ms since the limit's epoch).
    idle_since_ms: AtomicU64,
    /// Claimed for closing by the connection limit.
    closing: AtomicBool,
    /// A response was `101 Switching Protocols`: the connection is another protocol now.
    upgraded: AtomicBool,
    /// Told when the connection is to be closed (the limit needs its slot).
    pub(super) close: Notify,
    /// The connection task, to wake when the last response finishes.
    waker: Mutex<Option<Waker>>,
}

impl ConnShared {
    /// State for a new connection.
    pub(super) fn new(now_ms: u64) -> Self {
        Self {
            heads: AtomicU64::new(0),
            started: AtomicU64::new(0),
            done: AtomicU64::new(0),
            needs_flush: AtomicBool::new(false),
            idle: AtomicBool::new(true),
            awaiting_head: AtomicBool::new(true),
            idle_since_ms: AtomicU64::new(now_ms),
            closing: AtomicBool::new(false),
            upgraded: AtomicBool::new(false),
            close: Notify::new(),
            waker: Mutex::new(None),
        }
    }

    /// Whether every head hyper was given has been answered.
    fn quiet(&self) -> bool {
        self.heads.load(Ordering::Acquire) == self.done.load(Ordering::Acquire)
    }

    /// hyper handed a request to the service.
    pub(super) fn start_one(&self) {
        self.started.fetch_add(1, Ordering::AcqRel);
    }

    /// Every request hyper handed to the service has been answered, and flushed (what the
    /// guard knows once it no longer follows the heads itself).
    fn answered_all(&self) -> bool {
        self.started.load(Ordering::Acquire) == self.done.load(Ordering::Acquire)
            && !self.needs_flush.load(Ordering::Acquire)
    }

    /// A response finished or was abandoned.
    pub(super) fn finish_one(&self) {
        self.needs_flush.store(true, Ordering::Release);
        self.done.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut waker) = self.waker.lock()
            && let Some(w) = waker.take()
        {
            w.wake();
        }
    }

    /// Whether every head hyper was given has been answered and every answer flushed.
    fn settled(&self) -> bool {
        self.quiet() && !self.needs_flush.load(Ordering::Acquire)
    }

    /// Idle since (ms since the limit's epoch), when idle and not yet claimed for closing.
    pub(super) fn idle_since(&self) -> Option<u64> {
        (self.idle.load(Ordering::Acquire)
            && self.settled()
            && !self.closing.load(Ordering::Acquire))
        .then(|| self.idle_since_ms.load(Ordering::Acquire))
    }

    /// Resolves once the connection is between HTTP/1 requests: waiting for a head (none of
    /// it, or only part of it, received) with every request answered and flushed. A graceful
    /// shutdown closes such a connection instead of waiting for a head that may take up to
    /// `proxy.header_read_timeout` to come (a slow or stalled client would otherwise hold the
    /// stop for the whole `proxy.shutdown_grace`). Checked every 50 ms: it runs only while
    /// outpost stops. Never resolves for HTTP/2 or an upgraded connection.
    pub(super) async fn between_requests(&self) {
        loop {
            if self.awaiting_head.load(Ordering::Acquire) && self.settled() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// A response switched the connection to another protocol.
    pub(super) fn mark_upgraded(&self) {
        self.upgraded.store(true, Ordering::Release);
    }

    /// Claim this connection for closing; false when another caller already did.
    pub(super) fn claim_for_closing(&self) -> bool {
        !self.closing.swap(true, Ordering::AcqRel)
    }

    /// A request head was handed over (for tests of the limit).
    #[cfg(test)]
    pub(super) fn begin_for_test(&self) {
        self.heads.fetch_add(1, Ordering::AcqRel);
    }

    fn park(&self, waker: &Waker) {
        if let Ok(mut slot) = self.waker.lock() {
            *slot = Some(waker.clone());
        }
    }
}

/// Why the guard refused a request head (each a 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `Content-Length` together with `Transfer-Encoding`.
    LengthAndChunked,
    /// More than one `Content-Length` line.
    DuplicateLength,
    /// More than one `Host` line.
    DuplicateHost,
    /// HTTP/1.1 without `Host`.
    MissingHost,
    /// A line of the head ends in a bare LF: parsers that disagree on it disagree on where a
    /// header (`Content-Length`!) begins, so it is refused rather than interpreted.
    BareLf,
}

impl Refusal {
    fn message(self) -> &'static str {
        match self {
            Refusal::LengthAndChunked => "Content-Length together with Transfer-Encoding",
            Refusal::DuplicateLength => "more than one Content-Length",
            Refusal::DuplicateHost => "more than one Host",
            Refusal::MissingHost => "HTTP/1.1 request without Host",
            Refusal::BareLf => "a line of the request head ends in a bare LF, not CRLF",
        }
    }
}

/// Where the guard is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The first bytes of the connection, while they match the HTTP/2 preface (`n` so far).
    Preface(usize),
    /// Reading a request head.
    Head,
    /// Skipping a body of this many more bytes.
    Body(u64),
    /// Skipping a chunked body.
    Chunked(Chunk),
    /// After an upgrade request, until its answer says whether the protocol switched.
    Upgrade,
    /// Not HTTP/1 any more (h2, an upgrade) or something hyper refuses anyway: pass through.
    Opaque,
}

/// The chunked-body states of hyper's decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Data(u64),
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

/// The outcome of feeding bytes to [`Framing`].
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Pass every byte on.
    Pass,
    /// Pass on the first `keep` bytes, then refuse: they end just before the refused head.
    Refuse { keep: usize, why: Refusal },
}

/// Follows HTTP/1 message framing over a connection's incoming bytes.
#[derive(Debug)]
struct Framing {
    phase: Phase,
    /// The request head read so far.
    head: Vec<u8>,
    /// Longest head followed; beyond it hyper refuses the request itself.
    head_limit: usize,
    /// The chunk size being read.
    size: u64,
    /// The connection began with the HTTP/2 preface.
    h2: bool,
}

impl Framing {
    fn new(head_limit: usize) -> Self {
        Self {
            phase: Phase::Preface(0),
            head: Vec::new(),
            head_limit,
            size: 0,
            h2: false,
        }
    }

    /// HTTP/1 goes on (not HTTP/2, not upgraded) but the framing is no longer followed: after
    /// a head hyper refuses, a body framing hyper refuses, or bytes sent ahead of the answer
    /// to an upgrade request.
    fn lost(&self, upgraded: bool) -> bool {
        self.phase == Phase::Opaque && !self.h2 && !upgraded
    }

    /// Waiting for (part of) a request head.
    fn awaiting_head(&self) -> bool {
        matches!(self.phase, Phase::Preface(_) | Phase::Head)
    }

    /// Bytes of the next head received so far.
    fn partial_head(&self) -> usize {
        match self.phase {
            Phase::Preface(n) => n,
            Phase::Head => self.head.len(),
            _ => 0,
        }
    }

    /// Follow `data`; `heads` counts every head passed on to hyper.
    fn feed(&mut self, data: &[u8], heads: &AtomicU64) -> Verdict {
        let mut i = 0;
        // Where in `data` the head being read began (0 when it began in earlier data).
        let mut head_start = 0;
        while i < data.len() {
            match self.phase {
                Phase::Opaque => return Verdict::Pass,
                Phase::Upgrade => {
                    // Bytes before the answer: the client speaks the new protocol already, or
                    // pipelines; either way, stop following.
                    self.give_up();
                    return Verdict::Pass;
                }
                Phase::Preface(seen) => {
                    let n = (H2_PREFACE.len() - seen).min(data.len() - i);
                    if data[i..i + n] == H2_PREFACE[seen..seen + n] {
                        i += n;
                        self.phase = if seen + n == H2_PREFACE.len() {
                            self.h2 = true;
                            Phase::Opaque
                        } else {
                            Phase::Preface(seen + n)
                        };
                    } else {
                        // HTTP/1 after all: what matched so far starts its first head.
                        self.head.extend_from_slice(&H2_PREFACE[..seen]);
                        self.phase = Phase::Head;
                    }
                }
                Phase::Head => {
                    if self.head.is_empty() {
                        head_start = i;
                    }
                    let before = self.head.len();
                    let room = self.head_limit.saturating_sub(before);
                    let take = room.min(data.len() - i);
                    let new = &data[i..i + take];
                    self.head.extend_from_slice(new);
                    if !new.contains(&b'\n') {
                        if take < data.len() - i {
                            self.give_up();
                        }
                        i += take;
                        continue;
                    }
                    match self.complete_head() {
                        Ok(Some(len)) => {
                            heads.fetch_add(1, Ordering::AcqRel);
                            i += len - before;
                            self.head.clear();
                        }
                        Ok(None) => {
                            if take < data.len() - i {
                                self.give_up();
                            }
                            i += take;
                        }
                        Err(why) => {
                            self.phase = Phase::Opaque;
                            return Verdict::Refuse {
                                keep: head_start,
                                why,
                            };
                        }
                    }
                }
                Phase::Body(left) => {
                    let n = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(data.len() - i);
                    i += n;
                    let left = left - n as u64;
                    self.phase = if left == 0 {
                        Phase::Head
                    } else {
                        Phase::Body(left)
                    };
                }
                Phase::Chunked(Chunk::Data(left)) => {
                    let n = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(data.len() - i);
                    i += n;
                    let left = left - n as u64;
                    self.phase = Phase::Chunked(if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left)
                    });
                }
                Phase::Chunked(state) => {
                    self.phase = match chunk_step(state, data[i]) {
                        Some(ChunkStep::Next(s)) => Phase::Chunked(s),
                        Some(ChunkStep::Size(s, digit)) => match self.add_digit(digit) {
                            Some(()) => Phase::Chunked(s),
                            None => Phase::Opaque,
                        },
                        Some(ChunkStep::SizeDone) => match self.take_size() {
                            0 => Phase::Chunked(Chunk::EndCr),
                            n => Phase::Chunked(Chunk::Data(n)),
                        },
                        Some(ChunkStep::End) => Phase::Head,
                        None => Phase::Opaque,
                    };
                    i += 1;
                }
            }
        }
        Verdict::Pass
    }

    /// Stop following: hyper refuses what comes (or it is not HTTP/1).
    fn give_up(&mut self) {
        self.phase = Phase::Opaque;
        self.head = Vec::new();
    }

    /// Parse the buffered head: its length when complete and acceptable (and the phase for
    /// what follows it set), `None` while incomplete, the refusal when it is refused.
    fn complete_head(&mut self) -> Result<Option<usize>, Refusal> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let len = match req.parse(&self.head) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => {
                // hyper answers 400 or 431 and closes.
                self.give_up();
                return Ok(None);
            }
        };
        let head = &self.head[..len];
        if head
            .iter()
            .enumerate()
            .any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
        {
            return Err(Refusal::BareLf);
        }
        let mut lengths = 0;
        let mut length = None;
        let mut chunked = None;
        let mut hosts = 0;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                // `Content-Length: 4, 4` is two lengths in one line.
                lengths += 1 + h.value.iter().filter(|&&b| b == b',').count();
                length = std::str::from_utf8(h.value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok());
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                // Like hyper: the last line's last coding decides.
                let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("host") {
                hosts += 1;
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        let http11 = req.version == Some(1);
        if lengths > 1 {
            return Err(Refusal::DuplicateLength);
        }
        if lengths > 0 && chunked.is_some() {
            return Err(Refusal::LengthAndChunked);
        }
        if hosts > 1 {
            return Err(Refusal::DuplicateHost);
        }
        if http11 && hosts == 0 {
            return Err(Refusal::MissingHost);
        }
        self.phase = if (upgrade && http11) || req.method == Some("CONNECT") {
            // What follows may be another protocol: the answer tells.
            Phase::Upgrade
        } else {
            match (chunked, lengths) {
                (Some(true), _) if http11 => Phase::Chunked(Chunk::Start),
                // hyper refuses these (a coding other than chunked last, HTTP/1.0 chunked,
                // an invalid length).
                (Some(_), _) => Phase::Opaque,
                (None, 1) => match length {
                    Some(0) => Phase::Head,
                    Some(n) => Phase::Body(n),
                    None => Phase::Opaque,
                },
                (None, _) => Phase::Head,
            }
        };
        Ok(Some(len))
    }

    /// One more hex digit of the chunk size; `None` on overflow (hyper refuses it too).
    fn add_digit(&mut self, digit: u8) -> Option<()> {
        self.size = self.size.checked_mul(16)?.checked_add(u64::from(digit))?;
        Some(())
    }

    fn take_size(&mut self) -> u64 {
        std::mem::take(&mut self.size)
    }
}

/// A transition of the chunked-body state machine on one byte.
enum ChunkStep {
    /// Go to this state.
    Next(Chunk),
    /// A size digit (its value), then this state.
    Size(Chunk, u8),
    /// The size line ended: the chunk's data follows (or the last chunk's trailers).
    SizeDone,
    /// The body ended.
    End,
}

/// hyper's chunked decoder, one byte at a time (`proto/h1/decode.rs`); `None` where hyper
/// fails the body too.
fn chunk_step(state: Chunk, b: u8) -> Option<ChunkStep> {
    use ChunkStep::{End, Next, Size, SizeDone};
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    Some(match (state, b) {
        (Chunk::Start, b) => Size(Chunk::Size, hex(b)?),
        (Chunk::Size, b) if hex(b).is_some() => Size(Chunk::Size, hex(b)?),
        (Chunk::Size | Chunk::SizeLws, b'\t' | b' ') => Next(Chunk::SizeLws),
        (Chunk::Size | Chunk::SizeLws, b';') => Next(Chunk::Extension),
        (Chunk::Size | Chunk::SizeLws | Chunk::Extension, b'\r') => Next(Chunk::SizeLf),
        (Chunk::Extension, b'\n') => return None,
        (Chunk::Extension, _) => Next(Chunk::Extension),
        (Chunk::SizeLf, b'\n') => SizeDone,
        (Chunk::DataCr, b'\r') => Next(Chunk::DataLf),
        (Chunk::DataLf, b'\n') => Next(Chunk::Start),
        (Chunk::Trailer, b'\r') => Next(Chunk::TrailerLf),
        (Chunk::Trailer, _) => Next(Chunk::Trailer),
        (Chunk::TrailerLf, b'\n') => Next(Chunk::EndCr),
        (Chunk::EndCr, b'\r') => Next(Chunk::EndLf),
        (Chunk::EndCr, _) => Next(Chunk::Trailer),
        (Chunk::EndLf, b'\n') => End,
        _ => return None,
    })
}

/// A refusal or timeout answer being written, then the connection closed.
#[derive(Debug)]
struct Answer {
    bytes: Vec<u8>,
    written: usize,
    stage: Stage,
    /// The error hyper gets once the answer is out.
    reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Waiting for hyper to have nothing in flight.
    Waiting,
    Writing,
    Flushing,
    ShuttingDown,
    Done,
}

impl Answer {
    fn new(status: &str, error: &str, message: &str) -> Self {
        let body = serde_json::json!({ "error": error, "message": message }).to_string();
        let bytes = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             cache-status: outpost; fwd=bypass\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
        Self {
            bytes,
            written: 0,
            stage: Stage::Waiting,
            reason: format!("{status}: {message}"),
        }
    }
}

/// Settings of a guarded connection.
#[derive(Debug, Clone, Copy)]
pub struct GuardOptions {
    /// Time allowed for a complete request head while nothing is in flight.
    pub header_read_timeout: Duration,
    /// Longest request head followed (hyper refuses longer ones itself).
    pub head_limit: usize,
}

/// The guarded I/O of one connection (see the module docs).
pub struct Guard<T> {
    inner: T,
    shared: Arc<ConnShared>,
    limits: Arc<Connections>,
    /// The connection's slot in its budget, given back when the socket is dropped.
    _admission: Admission,
    framing: Framing,
    timeout: Duration,
    /// The timer behind `due`: never later than it (see [`Guard::due_passed`]).
    deadline: Pin<Box<Sleep>>,
    /// When the current wait for a head times out.
    due: Instant,
    /// The wait the deadline was set for: whether the framing was lost, and the count that
    /// marks the wait (heads handed to hyper, or answers where the framing is lost); a new
    /// wait sets it anew.
    armed_for: Option<(bool, u64)>,
    /// hyper wrote since its last successful flush.
    unflushed: bool,
    answer: Option<Answer>,
}

impl<T> Guard<T> {
    /// Guard `inner`, a connection accepted at `accepted` and admitted with `admission`.
    pub fn new(inner: T, admission: Admission, options: GuardOptions, accepted: Instant) -> Self {
        Self {
            inner,
            shared: admission.shared().clone(),
            limits: admission.connections().clone(),
            _admission: admission,
            framing: Framing::new(options.head_limit),
            timeout: options.header_read_timeout,
            deadline: Box::pin(tokio::time::sleep_until(
                accepted + options.header_read_timeout,
            )),
            due: accepted + options.header_read_timeout,
            armed_for: Some((false, 0)),
            unflushed: false,
            answer: None,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Guard<T> {
    /// Whether hyper has nothing in flight: every head answered and every write flushed.
    fn settled(&self) -> bool {
        self.shared.settled() && !self.unflushed
    }

    /// Write the pending answer once hyper has nothing in flight, close, and fail the read.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let settled = self.settled();
            let Some(answer) = self.answer.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match answer.stage {
                Stage::Waiting => {
                    if !settled {
                        self.shared.park(cx.waker());
                        // The last response may have finished meanwhile.
                        if !self.shared.settled() || self.unflushed {
                            return Poll::Pending;
                        }
                    }
                    if let Some(answer) = self.answer.as_mut() {
                        answer.stage = Stage::Writing;
                    }
                }
                Stage::Writing => {
                    while answer.written < answer.bytes.len() {
                        let n = ready(
                            Pin::new(&mut self.inner)
                                .poll_write(cx, &answer.bytes[answer.written..]),
                        )?;
                        let Some(n) = n else {
                            return Poll::Pending;
                        };
                        if n == 0 {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                        }
                        answer.written += n;
                    }
                    answer.stage = Stage::Flushing;
                }
                Stage::Flushing => {
                    if ready(Pin::new(&mut self.inner).poll_flush(cx))?.is_none() {
                        return Poll::Pending;
                    }
                    answer.stage = Stage::ShuttingDown;
                }
                Stage::ShuttingDown => {
                    match Pin::new(&mut self.inner).poll_shutdown(cx) {
                        Poll::Pending => return Poll::Pending,
                        // The answer is out; a failed close changes nothing.
                        Poll::Ready(_) => answer.stage = Stage::Done,
                    }
                }
                Stage::Done => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        answer.reason.clone(),
                    )));
                }
            }
        }
    }

    /// Whether `due` has passed, else the waker registered for it. The timer is moved only when
    /// it fires early (a new wait pushed `due` later since it was set), not at every wait: a
    /// wait per request would otherwise move it in the timer wheel per request.
    fn due_passed(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.deadline.as_mut().poll(cx).is_pending() {
                return false;
            }
            if self.deadline.deadline() >= self.due {
                return true;
            }
            let due = self.due;
            self.deadline.as_mut().reset(due);
        }
    }

    /// A wait for a head, marked by `wait`: the first time it is seen, the deadline and the
    /// idle time start.
    fn wait_for_head(&mut self, wait: (bool, u64)) {
        if self.armed_for != Some(wait) {
            self.armed_for = Some(wait);
            self.due = Instant::now() + self.timeout;
            self.shared
                .idle_since_ms
                .store(self.limits.now_ms(), Ordering::Release);
        }
    }

    /// The header-read deadline where the framing is lost (hyper's own header timer is off:
    /// the guard times every head, see `server.rs`): with every request hyper handed on
    /// answered, the next one must come within the timeout of the last answer. Bytes trickling
    /// in meanwhile do not move it. `true` when it has passed.
    fn lost_deadline_passed(&mut self, cx: &mut Context<'_>) -> bool {
        let waiting = self.shared.answered_all() && !self.unflushed;
        self.shared.idle.store(waiting, Ordering::Release);
        if !waiting {
            self.armed_for = None;
            return false;
        }
        let answered = self.shared.done.load(Ordering::Acquire);
        self.wait_for_head((true, answered));
        self.due_passed(cx)
    }

    /// The header-read deadline, while hyper waits for a head with nothing in flight: `true`
    /// when it has passed.
    fn deadline_passed(&mut self, cx: &mut Context<'_>) -> bool {
        let waiting = self.framing.awaiting_head() && self.settled();
        let partial = self.framing.partial_head();
        self.shared
            .idle
            .store(waiting && partial == 0, Ordering::Release);
        self.shared.awaiting_head.store(waiting, Ordering::Release);
        if !waiting {
            self.armed_for = None;
            return false;
        }
        let heads = self.shared.heads.load(Ordering::Acquire);
        self.wait_for_head((false, heads));
        self.due_passed(cx)
    }
}

/// `Poll` as an `Option` so that loops can use `?` on the error.
fn ready<V>(poll: Poll<io::Result<V>>) -> io::Result<Option<V>> {
    match poll {
        Poll::Ready(Ok(v)) => Ok(Some(v)),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Ok(None),
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.answer.is_some() {
            return this.poll_answer(cx);
        }
        if this.framing.phase == Phase::Upgrade {
            if this.shared.upgraded.load(Ordering::Acquire) {
                this.framing.phase = Phase::Opaque;
            } else if this.settled() {
                // Answered without switching: HTTP/1 goes on.
                this.framing.phase = Phase::Head;
            }
        }
        if matches!(this.framing.phase, Phase::Opaque | Phase::Upgrade) {
            this.shared.awaiting_head.store(false, Ordering::Release);
            if this
                .framing
                .lost(this.shared.upgraded.load(Ordering::Acquire))
            {
                if this.lost_deadline_passed(cx) {
                    this.limits.count_timeout();
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request head within proxy.header_read_timeout",
                    )));
                }
            } else {
                this.shared.idle.store(false, Ordering::Release);
            }
            let before = buf.filled().len();
            let result = Pin::new(&mut this.inner).poll_read(cx, buf);
            if this.framing.phase == Phase::Upgrade && buf.filled().len() > before {
                this.framing.give_up();
            }
            return result;
        }
        if this.deadline_passed(cx) {
            this.limits.count_timeout();
            if this.framing.phase == Phase::Head && this.framing.partial_head() > 0 {
                this.answer = Some(Answer::new(
                    "408 Request Timeout",
                    "request_timeout",
                    &format!("no complete request head within {:?}", this.timeout),
                ));
                return this.poll_answer(cx);
            }
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request head within proxy.header_read_timeout",
            )));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        let verdict = this
            .framing
            .feed(&buf.filled()[before..], &this.shared.heads);
        if !this.framing.awaiting_head() {
            // A body, HTTP/2 or an upgrade began in these bytes: no longer between requests.
            this.shared.awaiting_head.store(false, Ordering::Release);
        }
        if buf.filled().len() > before {
            // Busy until the guard sees it waiting again with nothing received.
            this.shared.idle.store(false, Ordering::Release);
        }
        match verdict {
            Verdict::Pass => Poll::Ready(Ok(())),
            Verdict::Refuse { keep, why } => {
                this.limits.count_refused_head();
                buf.set_filled(before + keep);
                this.answer = Some(Answer::new("400 Bad Request", "bad_request", why.message()));
                if keep > 0 {
                    // Hand over what precedes the refused head; answer on the next read.
                    return Poll::Ready(Ok(()));
                }
                this.poll_answer(cx)
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.unflushed = true;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.unflushed = true;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = result {
            let was_pending = std::mem::take(&mut this.unflushed)
                | this.shared.needs_flush.swap(false, Ordering::AcqRel);
            if was_pending && this.answer.is_some() {
                // A pending answer waited for this flush: let the read side see it.
                cx.waker().wake_by_ref();
            }
        }
        result
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Marks a response finished when dropped (hyper drops a response body once it is written, or
/// when the connection ends).
#[derive(Debug)]
pub struct Finished(Arc<ConnShared>);

impl Finished {
    /// A response is under way on the connection of `shared`.
    pub fn new(shared: Arc<ConnShared>) -> Self {
        shared.start_one();
        Self(shared)
    }
}

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.finish_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(framing: &mut Framing, parts: &[&[u8]]) -> (Vec<Verdict>, u64) {
        let heads = AtomicU64::new(0);
        let verdicts = parts.iter().map(|p| framing.feed(p, &heads)).collect();
        (verdicts, heads.load(Ordering::Acquire))
    }

    fn one(bytes: &[u8]) -> (Verdict, u64, Phase) {
        let mut f = Framing::new(8192);
        let (mut v, heads) = feed_all(&mut f, &[bytes]);
        (v.remove(0), heads, f.phase)
    }

    #[test]
    fn ambiguous_framing_is_refused_at_the_start_of_its_head() {
        let cases: [(&[u8], Refusal); 8] = [
            (b"GET / HTTP/1.1\nHost: a\n\n", Refusal::BareLf),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\nContent-Length: 5\r\n\r\n",
                Refusal::BareLf,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                Refusal::LengthAndChunked,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                Refusal::LengthAndChunked,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\nabc",
                Refusal::DuplicateLength,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
                Refusal::DuplicateLength,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                Refusal::DuplicateHost,
            ),
            (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", Refusal::MissingHost),
        ];
        for (bytes, why) in cases {
            let (v, heads, _) = one(bytes);
            assert_eq!(
                v,
                Verdict::Refuse { keep: 0, why },
                "{}",
                String::from_utf8_lossy(bytes)
            );
            assert_eq!(heads, 0);
        }
        // HTTP/1.0 may leave Host out.
        assert_eq!(one(b"GET / HTTP/1.0\r\n\r\n").0, Verdict::Pass);
    }

    #[test]
    fn bodies_are_skipped_to_find_the_next_head() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
            POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
            5;ext=1\r\nHost:\r\n0\r\nX-Trailer: 1\r\n\r\n\
            GET /c HTTP/1.1\r\nHost: a\r\n\r\n\
            GET /d HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n";
        let refused_at = stream.len() - b"GET /d HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n".len();
        // Whole, and one byte at a time.
        let (v, heads, _) = one(stream);
        assert_eq!(
            v,
            Verdict::Refuse {
                keep: refused_at,
                why: Refusal::DuplicateHost
            }
        );
        assert_eq!(heads, 3);
        let mut f = Framing::new(8192);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let (verdicts, heads) = feed_all(&mut f, &bytes);
        assert_eq!(heads, 3);
        let refused: Vec<usize> = verdicts
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != Verdict::Pass)
            .map(|(i, _)| i)
            .collect();
        // The refusal comes with the head's last byte; nothing of it is kept in that read.
        assert_eq!(refused, [stream.len() - 1]);
        assert!(matches!(
            verdicts[stream.len() - 1],
            Verdict::Refuse { keep: 0, .. }
        ));
    }

    #[test]
    fn h2_upgrades_and_what_hyper_refuses_are_passed_through() {
        let (v, _, phase) = one(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00");
        assert_eq!((v, phase), (Verdict::Pass, Phase::Opaque));
        // A method starting like the preface is HTTP/1.
        let (v, heads, phase) = one(b"PRIX / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!((v, heads, phase), (Verdict::Pass, 1, Phase::Head));
        let (_, _, phase) = one(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        );
        assert_eq!(phase, Phase::Upgrade);
        let (_, _, phase) = one(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05",
        );
        assert_eq!(phase, Phase::Opaque);
        let (v, _, phase) = one(b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n");
        assert_eq!((v, phase), (Verdict::Pass, Phase::Opaque));
        let (v, _, phase) =
            one(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
        assert_eq!((v, phase), (Verdict::Pass, Phase::Opaque));
        let mut f = Framing::new(64);
        let (v, _) = feed_all(&mut f, &[&[b'a'; 100]]);
        assert_eq!((&v[..], f.phase), (&[Verdict::Pass][..], Phase::Opaque));
    }

    #[test]
    fn a_partial_head_is_visible() {
        let mut f = Framing::new(8192);
        let heads = AtomicU64::new(0);
        assert!(f.awaiting_head());
        assert_eq!(f.partial_head(), 0);
        assert_eq!(f.feed(b"GET / HT", &heads), Verdict::Pass);
        assert_eq!(f.partial_head(), 8);
        assert_eq!(f.feed(b"TP/1.1\r\nHost: a\r\n\r\n", &heads), Verdict::Pass);
        assert_eq!((f.partial_head(), heads.load(Ordering::Acquire)), (0, 1));
    }
}
