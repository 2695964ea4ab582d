//! The keep-alive loop of one HTTP/1.x client connection: wait (idle, holding no buffer), read a
//! head (bounded in size and time), hand the request to `forward`, write its response, and go on
//! only when the request body ended where its framing says and both sides want to.
//!
//! Two clocks: the idle limit between requests (long, so authenticated NTLM connections survive
//! think time) counts from the end of the previous response; the head limit (short: slowloris)
//! counts from the first byte of a head. A graceful shutdown closes idle connections at once and
//! lets the request in flight finish (its response says `Connection: close`).

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
};

use http::{Method, Request, Response, StatusCode, Version, header};
use tokio::{
    io::AsyncWriteExt,
    sync::{oneshot, watch},
    time::Instant,
};

use super::{
    body::{ContinueGate, H1Body, Returned},
    framing::Framing,
    head::{self, HeadError, RequestHead},
    reader::{Reader, Upgraded, WriteIo},
    response::{BodyLength, Encoding, Exchange, encode_head, write_body},
};
use crate::proxy::{ClientConnection, connection, forward, request_body::RequestBody};
use crate::recycled::Recycled;

/// The client side of an upgrade (`101 Switching Protocols`), as the request carries it: the
/// connection, once the `101` has been written. (Request extensions must be `Clone`.)
#[derive(Clone)]
pub struct PendingUpgrade(pub Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

/// How reading a request head ended, when no head came.
enum NoHead {
    /// The client closed: close quietly.
    Gone,
    /// The head did not arrive in time.
    TimedOut,
    Refused(HeadError),
}

/// Serves requests until the connection closes.
///
/// While idle, this future holds only the stream and the wait for the next request: everything a
/// request needs (its head, the exchange with the backend, the response) lives in a boxed future
/// of its own for as long as the request does.
pub(in crate::proxy) async fn serve(
    mut reader: Reader,
    mut writer: WriteIo,
    connection: &Arc<ClientConnection>,
    shutdown: &mut watch::Receiver<bool>,
) {
    let timeouts = connection.live.timeouts;
    // hyper's header timer bounded idle time and head time together; the idle limit is the
    // longer of the two so that a short head limit never cuts idle keep-alive connections.
    let idle_limit = timeouts.idle.max(timeouts.header_read);
    // The wait for a stop and the idle timer live as long as the connection: set up once, each
    // idle wait only polls them (the timer moved later, which leaves the timer wheel alone), where
    // a new timer and a new wait per request cost about a twentieth of a request's instructions.
    let mut stop_watch = shutdown.clone();
    let stop = stopping(&mut stop_watch);
    let idle_timer = tokio::time::sleep(idle_limit);
    tokio::pin!(stop, idle_timer);
    loop {
        let idle_since = Instant::now();
        idle_timer.as_mut().reset(idle_since + idle_limit);
        let waited = wait_for_request(
            &mut reader,
            connection,
            stop.as_mut(),
            idle_timer.as_mut(),
            idle_limit,
        );
        if !waited.await {
            return;
        }
        // The request's future is kilobytes: made in a recycled block (the last one this worker
        // freed, still in the cache) and written in place, not built on the stack and copied.
        let request = Recycled::make(|| {
            request(
                reader,
                &mut writer,
                connection,
                shutdown,
                idle_since + idle_limit,
            )
        });
        match request.await {
            Next::Request(next) => reader = next,
            Next::Close => {
                let _ = writer.shutdown().await;
                return;
            }
            // The reader is gone already; the writer goes with this future: the socket closes.
            Next::Drop => return,
        }
        reader.release_if_empty();
    }
}

/// What follows a request.
enum Next {
    /// The next request, from this reader.
    Request(Reader),
    /// Close the connection, shutting its write side down first: a TLS connection's close_notify,
    /// and a FIN even while a request body still holds the read side.
    Close,
    /// Close a plain TCP connection that has nothing left to read or to send: the reader was
    /// dropped here, so dropping the writer closes the socket, and close(2) sends the FIN by itself
    /// (a shutdown before it would be one more system call per connection).
    Drop,
}

impl From<Option<Reader>> for Next {
    fn from(reader: Option<Reader>) -> Self {
        reader.map_or(Next::Close, Next::Request)
    }
}

/// Waits, holding no buffer, for the first bytes of the next request; `false`: close (the client
/// closed, the idle limit passed, or the gateway is stopping). `stop` has not completed yet: it
/// completes once, and the connection closes then.
async fn wait_for_request(
    reader: &mut Reader,
    connection: &ClientConnection,
    stop: Pin<&mut impl Future<Output = ()>>,
    idle_timer: Pin<&mut tokio::time::Sleep>,
    idle_limit: std::time::Duration,
) -> bool {
    tokio::select! {
        biased;
        () = stop => false,
        read = reader.wait_for_request() => match read {
            Ok(n) => n > 0,
            Err(e) => {
                tracing::debug!(conn = %connection.conn, error = %e, "client connection ended with an error");
                false
            }
        },
        () = idle_timer => {
            tracing::debug!(conn = %connection.conn, limit_secs = idle_limit.as_secs_f64(), "idle client connection timed out; closing");
            false
        }
    }
}

/// One request, from its first bytes to the end of its response, and what follows it.
async fn request(
    mut reader: Reader,
    writer: &mut WriteIo,
    connection: &Arc<ClientConnection>,
    shutdown: &watch::Receiver<bool>,
    idle_deadline: Instant,
) -> Next {
    let header_read = connection.live.timeouts.header_read;
    // The head limit counts from its first byte, within what is left of the idle limit.
    let deadline = (Instant::now() + header_read).min(idle_deadline);
    match read_head(&mut reader, connection, deadline).await {
        Ok(head) => exchange(head, reader, writer, connection, shutdown).await,
        Err(NoHead::Gone) => Next::Close,
        Err(NoHead::TimedOut) => {
            tracing::info!(conn = %connection.conn, limit_secs = header_read.as_secs_f64(), "request head not complete in time (slowloris?); closing");
            Next::Close
        }
        Err(NoHead::Refused(e)) => {
            refuse(e, connection, writer).await;
            Next::Close
        }
    }
}

/// Reads the rest of a request head whose first bytes have arrived.
async fn read_head(
    reader: &mut Reader,
    connection: &ClientConnection,
    deadline: Instant,
) -> Result<RequestHead, NoHead> {
    let max = connection.live.limits.max_header_bytes;
    loop {
        match head::parse(&mut reader.buf, max) {
            Ok(Some(head)) => return Ok(head),
            Ok(None) => {}
            Err(e) => return Err(NoHead::Refused(e)),
        }
        match tokio::time::timeout_at(deadline, reader.fill()).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) => return Err(NoHead::Gone),
            Ok(Err(e)) => {
                tracing::debug!(conn = %connection.conn, error = %e, "client connection ended with an error");
                return Err(NoHead::Gone);
            }
            Err(_) => return Err(NoHead::TimedOut),
        }
    }
}

/// Resolves when the gateway stops (at once if it is stopping already).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    if *shutdown.borrow_and_update() {
        return;
    }
    let _ = shutdown.changed().await;
}

/// One request and its response, and what follows them.
async fn exchange(
    head: RequestHead,
    mut reader: Reader,
    writer: &mut WriteIo,
    connection: &Arc<ClientConnection>,
    shutdown: &watch::Receiver<bool>,
) -> Next {
    let RequestHead {
        request,
        framing,
        keep_alive,
        expect_continue,
    } = head;
    let (mut parts, ()) = request.into_parts();
    let method = parts.method.clone();
    let version = parts.version;
    let gate = (expect_continue && framing != Framing::Empty).then(ContinueGate::new);
    let (body, back) = match framing {
        Framing::Empty => (H1Body::empty(), None),
        Framing::Length(_) | Framing::Chunked => {
            let (tx, rx) = oneshot::channel();
            let length = match framing {
                Framing::Length(n) => Some(n),
                _ => None,
            };
            let taken = std::mem::replace(&mut reader, Reader::detached());
            (H1Body::new(taken, length, tx, gate.clone()), Some(rx))
        }
    };
    // As hyper: a request may switch protocols when it is HTTP/1.1 and asks to (or is CONNECT).
    let upgrade = (version == Version::HTTP_11
        && (parts.headers.contains_key(header::UPGRADE) || method == Method::CONNECT))
        .then(|| {
            let (tx, rx) = oneshot::channel();
            parts
                .extensions
                .insert(PendingUpgrade(Arc::new(Mutex::new(Some(rx)))));
            tx
        });
    let request = Request::from_parts(parts, RequestBody::H1(body));
    let respond = forward::forward(request, connection);
    tokio::pin!(respond);
    let response = loop {
        let Some(gate) = &gate else {
            break respond.await;
        };
        tokio::select! {
            response = &mut respond => break response,
            () = gate.wanted() => {
                if gate.take_wanted() {
                    let sent = writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
                    if sent.is_err() || writer.flush().await.is_err() {
                        return Next::Close;
                    }
                }
            }
        }
    };
    if let Some(gate) = &gate {
        gate.settle();
    }
    let (parts, body) = response.into_parts();
    let exchange = Exchange {
        method: &method,
        version,
        keep_alive: keep_alive && !*shutdown.borrow(),
    };
    let passed = body.passed_fields();
    let passed_len = passed.map_or(0, |p| p.lines().len());
    let mut out = Vec::with_capacity(128 + 48 * parts.headers.len() + passed_len);
    let encoded = encode_head(&parts, passed, BodyLength::of(&body), exchange, &mut out);
    let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    if let Err(e) = write_body(body, &encoded, &mut out, writer).await {
        tracing::debug!(conn = %connection.conn, error = %e, "response not sent whole; closing the client connection");
        return Next::Close;
    }
    drop(out);
    if switching && let Some(upgrade) = upgrade {
        // The client side of the tunnel: this connection, with whatever it has read ahead.
        let Some(reader) = take_back(reader, back).await else {
            return Next::Close;
        };
        let writer = std::mem::replace(writer, WriteIo::sink());
        let _ = upgrade.send(Upgraded::new(reader, writer));
        return Next::Close;
    }
    if encoded.encoding == Encoding::CloseDelimited {
        return Next::Close;
    }
    if !encoded.keep_alive {
        // A request without a body, read whole, answered with a framed response: nothing is left
        // to read or to send, and the reader is here to be dropped (a request body may hold it
        // elsewhere, and only a shutdown would then end the response).
        let read_whole = back.is_none() && reader.buf.is_empty();
        return if read_whole && !connection.tls {
            Next::Drop
        } else {
            Next::Close
        };
    }
    // The next request starts where this one's body ends; a body that did not end cleanly (broken,
    // or dropped before its end arrived) leaves no such place.
    take_back(reader, back).await.into()
}

/// The reader, back from the request body if it had one and it ended cleanly.
async fn take_back(reader: Reader, back: Option<oneshot::Receiver<Returned>>) -> Option<Reader> {
    match back {
        None => Some(reader),
        Some(back) => match back.await {
            Ok(Returned {
                reader,
                clean: true,
            }) => Some(reader),
            _ => None,
        },
    }
}

/// Answers a head the gateway cannot take (as hyper's server does, with the same statuses), and
/// counts and logs it; the connection closes after it.
async fn refuse(e: HeadError, connection: &ClientConnection, writer: &mut WriteIo) {
    let Some(status) = e.status() else {
        tracing::debug!(conn = %connection.conn, error = %e, "client connection ended with an error");
        return;
    };
    connection::record_automatic_response(connection, status, &e);
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = status;
    let mut out = Vec::with_capacity(128);
    let exchange = Exchange {
        method: &Method::GET,
        version: Version::HTTP_11,
        keep_alive: false,
    };
    encode_head(&parts, None, BodyLength::Empty, exchange, &mut out);
    let _ = writer.write_all(&out).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<'a, Fut>(
        _: impl FnOnce(Reader, WriteIo, &'a Arc<ClientConnection>, &'a mut watch::Receiver<bool>) -> Fut,
    ) -> usize {
        std::mem::size_of::<Fut>()
    }

    fn request_future_size<'a, Fut>(
        _: impl FnOnce(
            Reader,
            &'a mut WriteIo,
            &'a Arc<ClientConnection>,
            &'a watch::Receiver<bool>,
            Instant,
        ) -> Fut,
    ) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// A request's future is allocated whole once per request, and any move of it copies all of
    /// it (8,976 bytes in a debug build, most of it the exchange with the backend).
    #[test]
    fn the_per_request_future_stays_bounded() {
        let size = request_future_size(request);
        assert!(size <= 9 * 1024, "a request takes {size} bytes");
    }

    /// What an idle connection keeps in its task is this future: it must not grow with what a
    /// request needs (a head alone is 248 bytes, the upstream exchange kilobytes). 712 bytes now,
    /// 1,024 when the head was read in this future. (632 when the stream's halves were boxed: a
    /// plain TCP connection's own halves take 24 bytes more here and save the split's shared cell
    /// and two boxes, about 150 bytes, elsewhere; 656 before the idle timer and the wait for a stop
    /// were kept for the connection's life, which saves two timer-wheel updates and a waiter
    /// registration per request.)
    #[test]
    fn the_idle_state_of_a_connection_stays_small() {
        let size = future_size(serve);
        assert!(size <= 712, "the keep-alive loop takes {size} bytes");
    }
}
