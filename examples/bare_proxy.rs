//! Not part of outpost: the floor of the HTTP stack outpost is built on, for the pass-through
//! rows of `bench/run.sh proxy`. A reverse proxy with nothing but hyper and tokio, arranged as
//! outpost's proxy is (one current-thread runtime per thread, `SO_REUSEPORT` listeners, HTTP/1
//! on both sides, `TCP_NODELAY`, mimalloc): each client connection gets one upstream connection
//! of its own, and requests and answers pass through untouched (no header rewriting, no
//! routing, no cache, no limits, no timeouts, no logging). What outpost costs above this row is
//! its own work; what this row costs above nginx is the stack's.
//!
//! `cargo run --release --example bare_proxy -- LISTEN UPSTREAM [THREADS]`
//! (addresses as `127.0.0.1:PORT`; THREADS defaults to 2).

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Mutex;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bare_proxy LISTEN UPSTREAM [THREADS]";
    let listen: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let upstream: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let threads: usize = args.next().map_or(Ok(2), |t| t.parse())?;
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || -> Result<(), Error> {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(serve(listen, upstream))
            })
        })
        .collect();
    for worker in workers {
        worker.join().map_err(|_| "a worker panicked")??;
    }
    Ok(())
}

/// Accept on a listener of this thread's own, one task per connection.
async fn serve(listen: SocketAddr, upstream: SocketAddr) -> Result<(), Error> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(listen)?;
    let listener = socket.listen(1024)?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = connection(stream, upstream).await {
                eprintln!("connection: {e}");
            }
        });
    }
}

/// One client connection and its own upstream connection.
async fn connection(stream: TcpStream, upstream: SocketAddr) -> Result<(), Error> {
    stream.set_nodelay(true)?;
    let up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    let (sender, conn) = client::handshake::<_, Incoming>(TokioIo::new(up)).await?;
    tokio::spawn(conn);
    // HTTP/1 answers one request at a time: the lock is never contended.
    let sender = Arc::new(Mutex::new(sender));
    let service = service_fn(move |req: Request<Incoming>| {
        let sender = sender.clone();
        async move {
            let mut sender = sender.lock().await;
            sender.ready().await?;
            let resp: Response<Incoming> = sender.send_request(req).await?;
            Ok::<_, hyper::Error>(resp)
        }
    });
    server::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await?;
    Ok(())
}
