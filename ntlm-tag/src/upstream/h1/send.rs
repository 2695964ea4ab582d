//! One exchange on one connection, up to the response head: the request head goes in one write
//! (the body follows as it comes), and the response head is read while the body is still being
//! sent.
#![forbid(unsafe_code)]

use std::{future::poll_fn, sync::Arc, task::Poll};

use bytes::BytesMut;
use http::{Request, Response, StatusCode, uri::Authority};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    body::UpstreamBody,
    conn::Connection,
    request::{Outgoing, SendError, encode_head},
    response_head::{self, ResponseHead, ResponseHeadError},
};
use crate::metrics::Metrics;
use crate::upstream::{ClientBody, connect::BackendIo};

/// Why an exchange failed before a response head arrived.
#[derive(Debug, Error)]
pub enum ExchangeError {
    #[error(transparent)]
    Send(#[from] SendError),
    #[error("reading the response: {0}")]
    Read(#[source] std::io::Error),
    #[error("the backend closed the connection before a complete response head")]
    Closed,
    #[error("{0}")]
    Head(#[from] ResponseHeadError),
}

/// How an exchange failed.
pub enum Failed {
    /// Not a byte of the request reached the backend: it can go on another connection.
    Unsent(Box<Request<ClientBody>>, ExchangeError),
    /// (Part of) the request may have reached the backend: it is never sent again.
    Sent(ExchangeError),
}

/// The other end of an upgraded upstream connection (after `101 Switching Protocols`): the stream,
/// and what the backend sent after the `101` head.
pub struct UpstreamUpgrade {
    pub io: BackendIo,
    pub read_ahead: BytesMut,
}

/// A `101` response carries its connection in this extension, for the tunnel.
#[derive(Clone)]
pub struct PendingUpstreamUpgrade(pub Arc<std::sync::Mutex<Option<UpstreamUpgrade>>>);

/// Sends `req` on `connection` and waits for the response head; the body streams from the
/// connection, which returns to the home its body is given.
pub async fn send(
    mut connection: Connection,
    req: Request<ClientBody>,
    stamped: &[u8],
    metrics: &Arc<Metrics>,
    backend: &Authority,
) -> Result<Response<UpstreamBody>, Failed> {
    let (mut parts, body) = req.into_parts();
    let mut head = Vec::with_capacity(128 + 64 * parts.headers.len() + stamped.len());
    let framing = encode_head(&mut parts, &body, stamped, &mut head);
    let mut outgoing = Outgoing::new(head, body, framing);
    let mut sent = false;
    let mut send_failed: Option<SendError> = None;
    let received = poll_fn(|cx| {
        if !sent && send_failed.is_none() {
            match outgoing.poll_send(&mut connection.io, cx) {
                Poll::Ready(Ok(())) => sent = true,
                Poll::Ready(Err(e @ SendError::Client(_))) => {
                    return Poll::Ready(Err(ExchangeError::Send(e)));
                }
                Poll::Ready(Err(e)) if outgoing.is_unsent() => {
                    return Poll::Ready(Err(ExchangeError::Send(e)));
                }
                // The backend may still answer (a 401 before it read the body, then a close).
                Poll::Ready(Err(e)) => send_failed = Some(e),
                Poll::Pending => {}
            }
        }
        read_head(&mut connection, &parts.method, cx)
    })
    .await;
    let head = match received {
        Ok(head) => head,
        Err(e) if outgoing.is_unsent() => {
            let body = outgoing
                .into_body()
                .unwrap_or_else(|| ClientBody::new(http_body_util::Empty::new()));
            return Err(Failed::Unsent(
                Box::new(Request::from_parts(parts, body)),
                e,
            ));
        }
        Err(e) => return Err(Failed::Sent(send_failed.map_or(e, ExchangeError::Send))),
    };
    let ResponseHead {
        response,
        framing,
        keep_alive,
        passed,
    } = head;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let (io, read_ahead) = connection.into_parts();
        let mut response =
            response.map(|()| UpstreamBody::detached(Arc::clone(metrics), backend.clone()));
        response
            .extensions_mut()
            .insert(PendingUpstreamUpgrade(Arc::new(std::sync::Mutex::new(
                Some(UpstreamUpgrade { io, read_ahead }),
            ))));
        return Ok(response);
    }
    let request = (!sent).then_some(outgoing);
    // A request not written whole leaves the connection unusable, whatever the response says.
    let body = UpstreamBody::new(
        connection,
        request,
        framing,
        keep_alive && send_failed.is_none(),
        passed,
        Arc::clone(metrics),
        backend.clone(),
    );
    Ok(response.map(|()| body))
}

/// Reads until a complete response head is buffered.
fn read_head(
    connection: &mut Connection,
    method: &http::Method,
    cx: &mut std::task::Context<'_>,
) -> Poll<Result<ResponseHead, ExchangeError>> {
    loop {
        if let Some(head) = response_head::parse(&mut connection.read, method)? {
            return Poll::Ready(Ok(head));
        }
        match std::task::ready!(connection.poll_fill(cx)) {
            Ok(0) => return Poll::Ready(Err(ExchangeError::Closed)),
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(ExchangeError::Read(e))),
        }
    }
}

impl AsyncRead for UpstreamUpgrade {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.read_ahead.is_empty() {
            let n = self.read_ahead.len().min(out.remaining());
            let ahead = self.read_ahead.split_to(n);
            out.put_slice(&ahead);
            return Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, out)
    }
}

impl AsyncWrite for UpstreamUpgrade {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
