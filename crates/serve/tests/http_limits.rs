//! The HTTP layer's limits, on a trivial router: a connection that stalls in its request
//! head, or midway through its body, is closed after the timeout while other clients are
//! answered; a body without a declared length is refused once it passes the limit; and a
//! connection over the limit gets 503 at once.

use std::time::{Duration, Instant};

use axum::routing::get;
use kollava_serve::{serve_router, HttpLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn start(limits: HttpLimits) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new()
        .route(
            "/",
            get(|| async { "ok" })
                .post(|body: axum::body::Bytes| async move { format!("got {}", body.len()) }),
        )
        .layer(axum::extract::DefaultBodyLimit::max(1024));
    tokio::spawn(serve_router(
        listener,
        router,
        limits,
        std::future::pending::<()>(),
    ));
    addr
}

/// Everything the server sends until it closes, or `None` if it is still open after `wait`.
async fn read_until_closed(conn: &mut TcpStream, wait: Duration) -> Option<String> {
    let mut got = Vec::new();
    tokio::time::timeout(wait, conn.read_to_end(&mut got))
        .await
        .ok()
        .map(|_| String::from_utf8_lossy(&got).into_owned())
}

async fn get_root(addr: std::net::SocketAddr) -> String {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    read_until_closed(&mut c, Duration::from_secs(10))
        .await
        .expect("answered")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_request_head_is_closed_while_others_are_answered() {
    let addr = start(HttpLimits {
        header_timeout: Duration::from_secs(1),
        max_connections: 16,
        ..Default::default()
    })
    .await;
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"POST / HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let t0 = Instant::now();
    assert!(get_root(addr).await.ends_with("ok"));
    let closed = read_until_closed(&mut stalled, Duration::from_secs(10)).await;
    assert!(closed.is_some(), "a stalled connection stays open");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed before the timeout: {waited:?}"
    );
    // And it does not hurt the next clients.
    assert!(get_root(addr).await.ends_with("ok"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_over_the_limit_gets_503_at_once() {
    let addr = start(HttpLimits {
        header_timeout: Duration::from_secs(20),
        max_connections: 2,
        ..Default::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        held.push(c);
    }
    // The accept loop takes connections in order: let it see the two first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = TcpStream::connect(addr).await.unwrap();
    let answer = read_until_closed(&mut third, Duration::from_secs(5))
        .await
        .expect("answered at once");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too many open connections"), "{answer}");
    drop(held);
    // Slots come back as connections close.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(get_root(addr).await.ends_with("ok"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_kept_alive_connection_is_closed_after_the_header_timeout() {
    let addr = start(HttpLimits {
        header_timeout: Duration::from_secs(1),
        max_connections: 16,
        ..Default::default()
    })
    .await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = c.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Kept alive, then nothing more: closed once the next head is overdue.
    let rest = read_until_closed(&mut c, Duration::from_secs(10)).await;
    assert!(rest.is_some(), "an idle connection stays open");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_stalls_midway_is_ended_while_others_are_answered() {
    let addr = start(HttpLimits {
        body_timeout: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n0123456789")
        .await
        .unwrap();
    let t0 = Instant::now();
    assert!(get_root(addr).await.ends_with("ok"));
    let answer = read_until_closed(&mut stalled, Duration::from_secs(10)).await;
    let answer = answer.expect("a stalled body keeps its connection open");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "ended before the timeout: {waited:?}"
    );
    assert!(
        !answer.contains("got "),
        "the handler ran on a cut body: {answer}"
    );
    // A whole body within the timeout is taken.
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(
        b"POST / HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 10\r\n\r\n0123456789",
    )
    .await
    .unwrap();
    let ok = read_until_closed(&mut c, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(ok.ends_with("got 10"), "{ok}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunked_body_is_refused_as_soon_as_it_passes_the_limit() {
    let addr = start(HttpLimits::default()).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    let chunk = vec![b'a'; 600];
    c.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..2 {
        c.write_all(b"258\r\n").await.unwrap();
        c.write_all(&chunk).await.unwrap();
        c.write_all(b"\r\n").await.unwrap();
    }
    // No closing chunk: the answer must not wait for the rest of the body.
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("answered before the body ends")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}
