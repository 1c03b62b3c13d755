//! Reliability suite, hostile input (issue #21, point 4b): one table-driven sweep of malformed
//! and smuggling-shaped HTTP/1 requests against the real `outpost` binary over raw TCP.
//!
//! Every shape must get a clear 4xx or a closed connection, must not reach the test upstream
//! (each shape names a marker path, and the upstream's log of received requests is checked for
//! it), and outpost must be healthy afterwards (a normal request is proxied, `/healthz` and
//! `/readyz` answer 200). Each shape prints a `RELIABILITY` figure line with its result and
//! what was forwarded. The framing checks themselves (exact messages) are in `security.rs`.

mod common;

use std::time::Duration;

use common::reliability::report;
use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// `proxy.max_body_bytes` and header-read timeout of the outpost under test (small, so that
/// the oversized and slow shapes are cheap).
const CONFIG: &str = r#"
[proxy]
max_body_bytes = 1048576
max_header_bytes = 16384
header_read_timeout = "1s"

[queue]
max_body_bytes = 1048576
"#;

/// How a shape is sent.
enum Send {
    /// All at once.
    Bytes(Vec<u8>),
    /// A byte every 100 ms (slowloris), for this many bytes, then silence.
    Trickle(Vec<u8>),
}

/// What a shape may get: one of these statuses, or (when `close_ok`) a closed connection.
struct Shape {
    name: &'static str,
    marker: &'static str,
    send: Send,
    statuses: &'static [u16],
    close_ok: bool,
}

fn shape(
    name: &'static str,
    marker: &'static str,
    request: String,
    statuses: &'static [u16],
) -> Shape {
    Shape {
        name,
        marker,
        send: Send::Bytes(request.into_bytes()),
        statuses,
        close_ok: false,
    }
}

fn shapes() -> Vec<Shape> {
    let big_header = "x".repeat(20 * 1024);
    let many_headers: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let mut shapes = vec![
        shape(
            "CL+TE",
            "/echo/h-clte",
            "POST /echo/h-clte HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(),
            &[400],
        ),
        shape(
            "TE+CL",
            "/echo/h-tecl",
            "POST /echo/h-tecl HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 30\r\n\r\n0\r\n\r\nGET /echo/h-tecl-smuggled HTTP/1.1\r\nHost: a\r\n\r\n".into(),
            &[400],
        ),
        shape(
            "duplicate Content-Length",
            "/echo/h-clcl",
            "POST /echo/h-clcl HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd".into(),
            &[400],
        ),
        shape(
            "conflicting Content-Length",
            "/echo/h-clcl2",
            "POST /echo/h-clcl2 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd".into(),
            &[400],
        ),
        shape(
            "Content-Length list",
            "/echo/h-cllist",
            "POST /echo/h-cllist HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 5\r\n\r\nabcde".into(),
            &[400],
        ),
        shape(
            "negative Content-Length",
            "/echo/h-clneg",
            "POST /echo/h-clneg HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\nabcd".into(),
            &[400],
        ),
        shape(
            "Content-Length not a number",
            "/echo/h-clnan",
            "POST /echo/h-clnan HTTP/1.1\r\nHost: a\r\nContent-Length: 4x\r\n\r\nabcd".into(),
            &[400],
        ),
        shape(
            "Transfer-Encoding not chunked",
            "/echo/h-te-gzip",
            "POST /echo/h-te-gzip HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabcd".into(),
            &[400, 501],
        ),
        shape(
            "Transfer-Encoding chunked, identity",
            "/echo/h-te-list",
            "POST /echo/h-te-list HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n".into(),
            &[400, 501],
        ),
        shape(
            "Transfer-Encoding obfuscated",
            "/echo/h-te-obf",
            "POST /echo/h-te-obf HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n".into(),
            &[400],
        ),
        shape(
            "obs-fold",
            "/echo/h-fold",
            "GET /echo/h-fold HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n".into(),
            &[400],
        ),
        shape(
            "obs-fold of Content-Length",
            "/echo/h-fold-cl",
            "POST /echo/h-fold-cl HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n 4\r\n\r\nabcd".into(),
            &[400],
        ),
        shape(
            "bare LF line endings",
            "/echo/h-lf",
            "GET /echo/h-lf HTTP/1.1\nHost: a\n\n".into(),
            &[400],
        ),
        shape(
            "bare LF inside a header line",
            "/echo/h-lf2",
            "GET /echo/h-lf2 HTTP/1.1\r\nHost: a\r\nX-A: 1\nContent-Length: 5\r\n\r\n".into(),
            &[400],
        ),
        shape(
            "bare CR in a header value",
            "/echo/h-cr",
            "GET /echo/h-cr HTTP/1.1\r\nHost: a\r\nX-A: 1\r2\r\n\r\n".into(),
            &[400],
        ),
        shape(
            "NUL in a header value",
            "/echo/h-nul",
            "GET /echo/h-nul HTTP/1.1\r\nHost: a\r\nX-A: 1\x002\r\n\r\n".into(),
            &[400],
        ),
        shape(
            "space before the colon",
            "/echo/h-space",
            "GET /echo/h-space HTTP/1.1\r\nHost : a\r\n\r\n".into(),
            &[400],
        ),
        shape(
            "no Host in HTTP/1.1",
            "/echo/h-nohost",
            "GET /echo/h-nohost HTTP/1.1\r\nAccept: */*\r\n\r\n".into(),
            &[400],
        ),
        shape(
            "two Host lines",
            "/echo/h-hosts",
            "GET /echo/h-hosts HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(),
            &[400],
        ),
        shape(
            "garbage request line",
            "/echo/h-garbage",
            "GET/echo/h-garbage\r\n\r\n".into(),
            &[400],
        ),
        shape(
            "unknown HTTP version",
            "/echo/h-version",
            "GET /echo/h-version HTTP/3.7\r\nHost: a\r\n\r\n".into(),
            &[400, 505],
        ),
        shape(
            "oversized head (one 20 KiB header)",
            "/echo/h-bighead",
            format!("GET /echo/h-bighead HTTP/1.1\r\nHost: a\r\nX-Big: {big_header}\r\n\r\n"),
            &[431],
        ),
        shape(
            "too many header lines",
            "/echo/h-manyheaders",
            format!("GET /echo/h-manyheaders HTTP/1.1\r\nHost: a\r\n{many_headers}\r\n"),
            &[431],
        ),
        shape(
            "oversized body (Content-Length)",
            "/echo/h-bigbody",
            "POST /echo/h-bigbody HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\n\r\n".into(),
            &[413],
        ),
        shape(
            "bad chunk size",
            "/echo/h-badchunk",
            "POST /echo/h-badchunk HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabcd\r\n0\r\n\r\n".into(),
            &[400],
        ),
        shape(
            "invalid UTF-8 in the path",
            "/echo/h-utf8",
            "GET /echo/h-utf8/\u{00ff} HTTP/1.1\r\nHost: a\r\n\r\n".into(),
            &[400],
        ),
        shape(
            "%00 in the path",
            "/echo/h-nul%00x",
            "GET /echo/h-nul%00x HTTP/1.1\r\nHost: a\r\n\r\n".into(),
            &[400],
        ),
        shape(
            "%2e%2e climbing out",
            "/internal",
            "GET /%2e%2e/internal/secret HTTP/1.1\r\nHost: a\r\n\r\n".into(),
            &[400],
        ),
        shape(
            "absolute-form for another host",
            "/echo/h-absolute",
            "GET http://evil.example/echo/h-absolute HTTP/1.1\r\nHost: evil.example\r\n\r\n".into(),
            &[403],
        ),
        shape(
            "CONNECT",
            "evil.example",
            "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n".into(),
            &[403, 400, 405],
        ),
        shape(
            "reserved prefix climbed into",
            "/_outpost/",
            "GET /echo/../_outpost/mutations HTTP/1.1\r\nHost: a\r\n\r\n".into(),
            &[200, 400, 404],
        ),
    ];
    // The utf-8 shape carries the raw bytes 0xff 0xfe, not a UTF-8 encoded character.
    for s in &mut shapes {
        if s.name == "invalid UTF-8 in the path" {
            s.send = Send::Bytes(
                [&b"GET /echo/h-utf8/\xff\xfe HTTP/1.1\r\nHost: a\r\n\r\n"[..]].concat(),
            );
        }
    }
    // Oversized chunked body: a chunk header promising more than the limit, then data.
    let mut chunked =
        b"POST /echo/h-bigchunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n", 128 * 1024).as_bytes());
        chunked.extend(std::iter::repeat_n(b'b', 128 * 1024));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    shapes.push(Shape {
        name: "oversized body (chunked)",
        marker: "/echo/h-bigchunked",
        send: Send::Bytes(chunked),
        statuses: &[413],
        close_ok: true,
    });
    shapes.push(Shape {
        name: "slowloris head (partial, then silence)",
        marker: "/echo/h-slow",
        send: Send::Bytes(b"GET /echo/h-slow HTTP/1.1\r\nHost: a\r\nX-Slow: ".to_vec()),
        statuses: &[408],
        close_ok: true,
    });
    shapes.push(Shape {
        name: "slowloris head (a byte every 100 ms)",
        marker: "/echo/h-trickle",
        send: Send::Trickle(
            b"GET /echo/h-trickle HTTP/1.1\r\nHost: a\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa\r\n\r\n"
                .to_vec(),
        ),
        statuses: &[408],
        close_ok: true,
    });
    shapes
}

/// What came back: a status, or the connection closed without one.
#[derive(Debug, PartialEq)]
enum Answer {
    Status(u16),
    Closed,
}

/// Sends a shape on a fresh connection and reads the first answer (or the close).
async fn send(addr: std::net::SocketAddr, how: &Send) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    match how {
        Send::Bytes(bytes) => {
            // outpost may answer and close before all of a large body is written.
            let _ = stream.write_all(bytes).await;
        }
        Send::Trickle(bytes) => {
            for b in bytes {
                if stream.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        return;
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("an answer or a close within 20 s");
    let head = String::from_utf8_lossy(&buf);
    match head
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| head.strip_prefix("HTTP/1.0 "))
    {
        Some(rest) => Answer::Status(rest[..3].parse().expect("a status code")),
        None => {
            assert!(buf.is_empty(), "not an HTTP answer: {head:?}");
            Answer::Closed
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_shape_gets_a_clear_4xx_or_a_close_reaches_nothing_and_outpost_stays_healthy()
{
    let s = setup::Outpost::in_front_of(Upstream::start().await, CONFIG).await;
    let addr = s.outpost.addr();
    let shapes = shapes();
    let mut failures = Vec::new();
    for shape in &shapes {
        let answer = send(addr, &shape.send).await;
        let forwarded = s
            .upstream
            .requests()
            .iter()
            .filter(|r| r.path_and_query().contains(shape.marker) || r.path.contains(shape.marker))
            .count();
        let ok_answer = match answer {
            Answer::Status(code) => shape.statuses.contains(&code),
            Answer::Closed => shape.close_ok,
        };
        let result = match answer {
            Answer::Status(code) => code.to_string(),
            Answer::Closed => "closed".to_owned(),
        };
        report(
            "hostile",
            shape.name,
            json!({"result": result, "forwarded": forwarded}),
        );
        if !ok_answer || forwarded > 0 {
            failures.push(format!(
                "{}: got {result}, expected one of {:?}{}, forwarded {forwarded}",
                shape.name,
                shape.statuses,
                if shape.close_ok { " or a close" } else { "" }
            ));
        }
    }
    // Healthy afterwards: a normal request goes through, both probes answer.
    let resp = s
        .http
        .get(s.url("/echo/after-the-sweep"))
        .send()
        .await
        .expect("a normal request after the sweep");
    assert_eq!(resp.status(), 200);
    for probe in ["/healthz", "/readyz"] {
        let resp = s.http.get(s.admin_url(probe)).send().await.expect("probe");
        assert_eq!(resp.status(), 200, "{probe}");
    }
    assert!(
        !s.outpost.log().contains("panicked"),
        "{}",
        s.outpost.log_tail(40)
    );
    report(
        "hostile",
        "all shapes",
        json!({"shapes": shapes.len(), "failed": failures.len()}),
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
