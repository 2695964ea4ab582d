//! One exchange over a real loopback socket, against a backend that writes exactly the bytes given:
//! where the connection goes afterwards, and what is refused.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode, uri::Authority};
use http_body_util::{BodyExt, Empty};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_util::either::Either;

use super::{Connection, Failed, Home, Slot, SlotError, send};
use crate::{metrics::Metrics, upstream::ClientBody};

/// A backend that answers each request head it reads with the next of `answers`, and reports the
/// bytes it received on each connection.
async fn backend(answers: Vec<&'static [u8]>) -> (TcpStream, mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (seen, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut answers = answers.into_iter();
        let mut buf = vec![0u8; 64 * 1024];
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            let _ = seen.send(buf[..n].to_vec());
            while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                pending.drain(..end + 4);
                let Some(answer) = answers.next() else {
                    return;
                };
                if stream.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    });
    let stream = TcpStream::connect(addr).await.expect("connect");
    (stream, received)
}

fn get() -> Request<ClientBody> {
    Request::get("/")
        .header("host", "backend")
        .body(ClientBody::new(Empty::<Bytes>::new()))
        .expect("request")
}

fn authority() -> Authority {
    Authority::from_static("backend:80")
}

async fn exchange(
    stream: TcpStream,
    req: Request<ClientBody>,
) -> (
    Result<http::Response<super::UpstreamBody>, Failed>,
    Arc<Slot>,
) {
    let metrics = Arc::new(Metrics::default());
    let slot = Slot::busy();
    let sent = send(
        Connection::new(Either::Left(stream)),
        req,
        b"",
        &metrics,
        &authority(),
    )
    .await;
    let sent = sent.map(|mut response| {
        response.body_mut().return_to(Home::Own(Arc::clone(&slot)));
        response
    });
    (sent, slot)
}

async fn next_use(slot: &Slot) -> Result<(), SlotError> {
    slot.take(Duration::from_secs(5)).await.map(drop)
}

#[tokio::test]
async fn a_response_read_to_its_end_gives_the_connection_back_in_one_piece() {
    let (stream, mut received) =
        backend(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]).await;
    let (sent, slot) = exchange(stream, get()).await;
    let response = sent.ok().expect("a response");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.expect("body");
    assert_eq!(body.to_bytes(), "hello");
    assert_eq!(next_use(&slot).await, Ok(()));
    let head = received.recv().await.expect("the request");
    assert_eq!(
        head, b"GET / HTTP/1.1\r\nhost: backend\r\n\r\n",
        "one write, one head"
    );
}

#[tokio::test]
async fn a_chunked_response_with_trailers_is_decoded_and_the_connection_reused() {
    let (stream, _received) = backend(vec![
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
    ])
    .await;
    let (sent, slot) = exchange(stream, get()).await;
    let body = sent.ok().expect("a response").into_body();
    let collected = body.collect().await.expect("body");
    assert_eq!(
        collected
            .trailers()
            .and_then(|t| t.get("x-t"))
            .map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert_eq!(collected.to_bytes(), "hello");
    assert_eq!(next_use(&slot).await, Ok(()));
}

#[tokio::test]
async fn responses_that_end_with_the_connection_or_ask_to_close_are_never_reused() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"[..],
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
        // Bytes after the response: not a clean end.
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n",
    ] {
        let (stream, _received) = backend(vec![answer]).await;
        let (sent, slot) = exchange(stream, get()).await;
        let body = sent.ok().expect("a response").into_body();
        body.collect().await.expect("body");
        assert_eq!(next_use(&slot).await, Err(SlotError::Closed), "{answer:?}");
    }
}

#[tokio::test]
async fn a_body_dropped_half_read_closes_the_connection() {
    let (stream, _received) =
        backend(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello"]).await;
    let (sent, slot) = exchange(stream, get()).await;
    let mut body = sent.ok().expect("a response").into_body();
    let first = body.frame().await.expect("a frame").expect("data");
    assert_eq!(first.into_data().ok().as_deref(), Some(&b"hello"[..]));
    drop(body);
    assert_eq!(next_use(&slot).await, Err(SlotError::Closed));
}

#[tokio::test]
async fn hostile_response_heads_fail_the_exchange() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
    ] {
        let (stream, _received) = backend(vec![answer]).await;
        let (sent, _slot) = exchange(stream, get()).await;
        assert!(matches!(sent, Err(Failed::Sent(_))), "{answer:?}");
    }
}

#[tokio::test]
async fn a_bad_chunk_breaks_the_response_off() {
    let (stream, _received) = backend(vec![
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ])
    .await;
    let (sent, slot) = exchange(stream, get()).await;
    let body = sent.ok().expect("a response").into_body();
    assert!(body.collect().await.is_err());
    assert_eq!(next_use(&slot).await, Err(SlotError::Closed));
}

#[tokio::test]
async fn a_401_before_the_body_keeps_the_connection_until_the_body_is_sent() {
    let (stream, mut received) = backend(vec![
        b"HTTP/1.1 401 Unauthorized\r\nwww-authenticate: NTLM\r\ncontent-length: 0\r\n\r\n",
    ])
    .await;
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let body = ChannelBody(rx);
    let post = Request::post("/")
        .header("content-length", "4")
        .body(ClientBody::new(body))
        .expect("request");
    let (sent, slot) = exchange(stream, post).await;
    let response = sent.ok().expect("a response");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    drop(response);
    // The response is over, the body is not: the connection is not free yet.
    assert_eq!(
        slot.take(Duration::from_millis(100)).await.map(drop),
        Err(SlotError::Busy)
    );
    tx.send(Bytes::from_static(b"body")).await.expect("send");
    drop(tx);
    assert_eq!(next_use(&slot).await, Ok(()));
    let mut all = Vec::new();
    while !all.ends_with(b"body") {
        all.extend(received.recv().await.expect("bytes"));
    }
}

/// A request body the test sends piece by piece.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|data| data.map(|d| Ok(hyper::body::Frame::data(d))))
    }
}
