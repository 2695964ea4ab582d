//! Exchange-like traffic shapes on authenticated requests, chosen by query parameters so that one
//! acceptor serves every shape a test needs:
//! - `delay_ms=N`: answer after N milliseconds (an ActiveSync `Ping` long poll);
//! - `out_bytes=N`: answer with a body of N zero bytes, streamed (an Outlook Anywhere
//!   `RPC_OUT_DATA` response);
//! - an `Upgrade: websocket` request: `101` and a WebSocket echo (Windows Admin Center, SignalR).
//!
//! An `RPC_IN_DATA`-like upload needs nothing here: every request body is read to its end (and
//! counted in the log line) before the answer.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use hyper::body::{Body, Frame, SizeHint};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, handshake::derive_accept_key, protocol::Role},
};

/// What the query asks for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub delay: Option<Duration>,
    pub out_bytes: Option<u64>,
}

impl Shape {
    pub fn from_query(query: Option<&str>) -> Shape {
        let mut shape = Shape::default();
        for (key, value) in query
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
        {
            match (key, value.parse::<u64>()) {
                ("delay_ms", Ok(ms)) => shape.delay = Some(Duration::from_millis(ms)),
                ("out_bytes", Ok(n)) => shape.out_bytes = Some(n),
                _ => {}
            }
        }
        shape
    }
}

/// A body of `left` zero bytes in 64 KiB frames, never held in memory at once.
pub struct Zeros {
    left: u64,
    chunk: Bytes,
}

impl Zeros {
    pub fn new(len: u64) -> Zeros {
        Zeros {
            left: len,
            chunk: Bytes::from(vec![0u8; 64 * 1024]),
        }
    }
}

impl Body for Zeros {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(self.chunk.len());
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// The `Sec-WebSocket-Accept` value, when `headers` ask for a WebSocket.
pub fn websocket_accept(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(header::UPGRADE)?.to_str().ok()?;
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return None;
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY)?;
    HeaderValue::from_str(&derive_accept_key(key.as_bytes())).ok()
}

/// The `101` that switches to WebSocket.
pub fn switching_protocols<B: Default>(accept: HeaderValue) -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// Echoes every text and binary message until the client closes.
pub async fn echo(upgrade: OnUpgrade, serial: u64) {
    let upgraded = match upgrade.await {
        Ok(u) => u,
        Err(e) => {
            eprintln!("ntlm-acceptor: conn {serial}: upgrade failed: {e}");
            return;
        }
    };
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
    while let Some(message) = ws.next().await {
        let reply = match message {
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => m,
            // tungstenite answers a close itself; the stream ends once the answer is sent.
            Ok(_) => continue,
            Err(_) => break,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters() {
        assert_eq!(Shape::from_query(None), Shape::default());
        assert_eq!(
            Shape::from_query(Some("Cmd=Ping&delay_ms=1500&out_bytes=10")),
            Shape {
                delay: Some(Duration::from_millis(1500)),
                out_bytes: Some(10)
            }
        );
    }

    #[test]
    fn rfc_6455_accept_key() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert_eq!(
            websocket_accept(&h),
            Some(HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="))
        );
    }
}
