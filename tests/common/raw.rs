//! Raw HTTP/1 over TCP, for tests that send what HTTP clients refuse to send (ambiguous
//! framing, malformed heads) and read the answer byte by byte.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// A raw HTTP/1 answer: status code, head and body as text.
#[derive(Debug)]
pub struct RawResponse {
    /// The status code.
    pub status: u16,
    /// The head, as text.
    pub head: String,
    /// The body (by `Content-Length`), as text.
    pub body: String,
}

/// Reads exactly one HTTP/1 response (head, then a `Content-Length` body) from `stream`,
/// leaving whatever follows (a pipelined response) unread.
pub async fn read_response(stream: &mut TcpStream) -> RawResponse {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("an answer within 10 s")
            .expect("read the answer");
        assert!(
            n > 0,
            "connection closed before a complete response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut body))
        .await
        .expect("the body within 10 s")
        .expect("read the body");
    let body = String::from_utf8_lossy(&body).into_owned();
    RawResponse { status, head, body }
}

/// Sends raw bytes on a new connection and reads one response.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write the request");
    read_response(&mut stream).await
}

/// Whether the peer has closed `stream` (EOF or reset), reading and dropping whatever else
/// arrives; gives up after `within`.
pub async fn closed_within(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    within: Duration,
) -> bool {
    let mut chunk = [0u8; 1024];
    let read_to_end = async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_to_end).await.is_ok()
}
