//! A minimal HTTP/1.1 client on one TCP connection, with a chosen source address and port.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

pub struct Response {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

/// One client TCP connection.
pub struct Connection {
    sender: SendRequest<Full<Bytes>>,
    pub local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    raw_fd: i32,
}

impl Connection {
    /// Connects to `dst`, from `src` when given (a fixed port is reusable right after an abortive
    /// close, see [`close_abortively`](Self::close_abortively)).
    pub async fn open(src: Option<SocketAddr>, dst: SocketAddr) -> Connection {
        let stream = connect(src, dst, true).await;
        let local = stream.local_addr().expect("local addr");
        let raw_fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP handshake");
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Connection {
            sender,
            local,
            task,
            raw_fd,
        }
    }

    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.send("GET", path, headers, Bytes::new()).await
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Response {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "gateway.test");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let req = builder.body(Full::new(body)).expect("request");
        self.sender.ready().await.expect("connection ready");
        let resp = tokio::time::timeout(Duration::from_secs(20), self.sender.send_request(req))
            .await
            .expect("response within 20 s")
            .expect("response");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Response {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// Closes with RST (SO_LINGER 0), so the same source ip:port can connect again at once.
    pub async fn close_abortively(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on the connection's own open fd, with a valid linger struct.
        unsafe {
            libc::setsockopt(
                self.raw_fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
        self.close().await;
    }

    /// Closes the connection (FIN).
    pub async fn close(self) {
        drop(self.sender);
        self.task.abort();
        // Wait until the task (and with it the socket) is really gone.
        let _ = self.task.await;
    }
}

/// A TCP connection to `dst` (from `src` when given; `reuse_addr`: SO_REUSEADDR first), with
/// Nagle off; panics after 10 s or on an error.
pub async fn connect(src: Option<SocketAddr>, dst: SocketAddr, reuse_addr: bool) -> TcpStream {
    let socket = if dst.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .expect("socket");
    if reuse_addr {
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    }
    if let Some(src) = src {
        socket
            .bind(src)
            .unwrap_or_else(|e| panic!("bind {src}: {e}"));
    }
    let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(dst))
        .await
        .unwrap_or_else(|_| panic!("connect to {dst} timed out"))
        .unwrap_or_else(|e| panic!("connect to {dst}: {e}"));
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// One request on a fresh connection from `src`, closed with RST (SO_LINGER 0) so the same source
/// `ip:port` can connect again at once. Returns the status code.
pub async fn get_then_reset(src: SocketAddr, dst: SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Right after the previous connection from `src` was reset, a slow (emulated) kernel has been
    // seen to answer EADDRNOTAVAIL once: the old 4-tuple not yet unhashed. Retried, a few times.
    let mut attempts = 0;
    let mut stream = loop {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket
            .bind(src)
            .unwrap_or_else(|e| panic!("bind {src}: {e}"));
        match tokio::time::timeout(Duration::from_secs(10), socket.connect(dst))
            .await
            .unwrap_or_else(|_| panic!("connect to {dst} timed out"))
        {
            Ok(stream) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable && attempts < 20 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("connect from {src} to {dst}: {e}"),
        }
    };
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: gateway.test\r\n\r\n").as_bytes())
        .await
        .expect("write");
    // Read the head and a Content-Length body.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let status = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("response within 10 s")
            .expect("read");
        assert!(n > 0, "closed before a response");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= length {
                break head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .expect("status");
            }
        }
    };
    #[expect(
        deprecated,
        reason = "a zero linger resets at once; it never blocks on drop"
    )]
    stream.set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
    drop(stream);
    status
}
