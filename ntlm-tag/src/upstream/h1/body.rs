//! A backend's response body on its way to the client, read by its framing straight off the
//! upstream connection. It also sends what is left of the request body: backends answer an
//! unauthenticated POST with 401 before reading its body (normal for NTLM), so the response often
//! ends first.
//!
//! The connection goes [home](Home) only when both directions are done: the response read to its
//! end and the request sent whole. When the response ends first, a small task finishes sending the
//! request body, and closes the connection instead if the client abandons it. A body dropped
//! half-read, a broken response, a response the backend delimited by closing or that asked to
//! close: the connection is closed, never reused. A body the backend breaks off (a reset
//! mid-response) counts as an upstream error.
#![forbid(unsafe_code)]

use std::{
    future::poll_fn,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, uri::Authority};
use hyper::body::{Body, Frame, SizeHint};
use thiserror::Error;

use super::{
    conn::{Connection, Home},
    request::{Outgoing, SendError},
    response_head::ResponseFraming,
};
use crate::http1::{
    chunked::{ChunkError, ChunkedDecoder, Decoded},
    passed::PassedFields,
};
use crate::{error::ErrorSource, metrics::Metrics};

/// Why a response body could not be read to its end.
#[derive(Debug, Error)]
pub enum ResponseBodyError {
    #[error("reading the response body: {0}")]
    Io(#[from] std::io::Error),
    #[error("the backend closed the connection before the end of the response body")]
    Closed,
    #[error("invalid chunked response body: {0}")]
    Chunked(#[from] ChunkError),
}

enum Decoder {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    /// Read to its end (or never had a body).
    Done,
}

/// The connection and what is left of the request, while the exchange is under way.
struct Wire {
    connection: Connection,
    /// The rest of the request, until it has been sent whole.
    request: Option<Outgoing>,
    /// Sending the request failed: the connection cannot be reused.
    request_failed: bool,
}

/// The state lives in one box: a response is moved up through every level of the exchange and the
/// request's handling (a dozen moves), and the state is over 300 bytes where the box is 8.
pub struct UpstreamBody(Box<BodyState>);

struct BodyState {
    wire: Option<Wire>,
    decoder: Decoder,
    /// The backend lets the connection carry another request after this response.
    keep_alive: bool,
    home: Home,
    /// Until the body failed (then it is counted, once).
    metrics: Option<Arc<Metrics>>,
    backend: Authority,
    /// The head's fields that go to the client untouched. They travel with the body, which the
    /// gateway replaces whole when it answers in the backend's stead: a response of its own never
    /// carries a backend's fields.
    passed: PassedFields,
}

impl UpstreamBody {
    pub(super) fn new(
        connection: Connection,
        request: Option<Outgoing>,
        framing: ResponseFraming,
        keep_alive: bool,
        passed: PassedFields,
        metrics: Arc<Metrics>,
        backend: Authority,
    ) -> Self {
        let decoder = match framing {
            ResponseFraming::Empty => Decoder::Done,
            ResponseFraming::Length(n) => Decoder::Length(n),
            ResponseFraming::Chunked => Decoder::Chunked(ChunkedDecoder::new()),
            ResponseFraming::CloseDelimited => Decoder::UntilClose,
        };
        UpstreamBody(Box::new(BodyState {
            wire: Some(Wire {
                connection,
                request,
                request_failed: false,
            }),
            decoder,
            keep_alive,
            home: Home::Close,
            metrics: Some(metrics),
            backend,
            passed,
        }))
    }

    /// A body with no connection behind it (after a `101`, the connection is the tunnel's).
    pub(super) fn detached(metrics: Arc<Metrics>, backend: Authority) -> Self {
        UpstreamBody(Box::new(BodyState {
            wire: None,
            decoder: Decoder::Done,
            keep_alive: false,
            home: Home::Close,
            metrics: Some(metrics),
            backend,
            passed: PassedFields::default(),
        }))
    }

    /// The response head's fields that go to the client as they came.
    pub fn passed_fields(&self) -> &PassedFields {
        &self.0.passed
    }

    /// Where the connection goes once the exchange is over (closed unless told).
    pub(in crate::upstream) fn return_to(&mut self, home: Home) {
        self.0.home = home;
    }
}

impl BodyState {
    /// The response has been read to its end: the connection goes home once the request has been
    /// sent too.
    fn finish(&mut self) {
        self.decoder = Decoder::Done;
        let home = std::mem::replace(&mut self.home, Home::Close);
        let Some(wire) = self.wire.take() else {
            return home.settle(None);
        };
        let reusable = self.keep_alive && !wire.request_failed;
        let Wire {
            mut connection,
            request,
            ..
        } = wire;
        match request {
            None => home.settle((reusable && connection.read.is_empty()).then_some(connection)),
            Some(mut request) => {
                // The backend answered before it read the whole body: send the rest, then the
                // connection is free (it closes if the client abandons the body).
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return home.settle(None);
                };
                runtime.spawn(async move {
                    let sent = poll_fn(|cx| request.poll_send(&mut connection.io, cx)).await;
                    let reusable = reusable && sent.is_ok() && connection.is_reusable();
                    home.settle(reusable.then_some(connection));
                });
            }
        }
    }

    /// Sends more of the request body if it can, without waiting for it.
    fn drive_request(wire: &mut Wire, cx: &mut Context<'_>) {
        let Some(request) = &mut wire.request else {
            return;
        };
        match request.poll_send(&mut wire.connection.io, cx) {
            Poll::Pending => {}
            Poll::Ready(Ok(())) => wire.request = None,
            Poll::Ready(Err(e)) => {
                // The response goes on; the connection will not carry another request.
                let client = matches!(e, SendError::Client(_));
                tracing::debug!(error = %e, client, "request body not sent whole after the response began; the upstream connection closes after this response");
                wire.request = None;
                wire.request_failed = true;
            }
        }
    }

    fn poll_response(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        loop {
            let Some(wire) = self.wire.as_mut() else {
                return Poll::Ready(None);
            };
            Self::drive_request(wire, cx);
            let buf = &mut wire.connection.read;
            match &mut self.decoder {
                Decoder::Done => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Decoder::Length(left) if !buf.is_empty() => {
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                    *left -= n as u64;
                    let data = buf.split_to(n).freeze();
                    if *left == 0 {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoder::Chunked(decoder) => match decoder.decode(buf)? {
                    Decoded::Data(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Decoded::End(trailers) => {
                        self.finish();
                        return Poll::Ready(trailers_frame(trailers));
                    }
                    Decoded::NeedMore => {}
                },
                Decoder::UntilClose if !buf.is_empty() => {
                    let data = buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoder::Length(_) | Decoder::UntilClose => {}
            }
            let read = std::task::ready!(wire.connection.poll_fill(cx))?;
            if read == 0 {
                if matches!(self.decoder, Decoder::UntilClose) {
                    self.keep_alive = false;
                    self.finish();
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err(ResponseBodyError::Closed)));
            }
        }
    }
}

fn trailers_frame(trailers: HeaderMap) -> Option<Result<Frame<Bytes>, ResponseBodyError>> {
    (!trailers.is_empty()).then(|| Ok(Frame::trailers(trailers)))
}

impl Drop for BodyState {
    fn drop(&mut self) {
        // An empty body (a 401 without content, a 204) may never be polled: it is complete.
        if matches!(self.decoder, Decoder::Done) {
            self.finish();
        }
        // Otherwise the wire is dropped half-read: the connection closes, and its slot with it.
        if self.wire.take().is_some() {
            std::mem::replace(&mut self.home, Home::Close).settle(None);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        let this = &mut *self.0;
        let polled = this.poll_response(cx);
        if let Poll::Ready(Some(Err(e))) = &polled {
            // Reading the backend's response failed: the backend reset or closed mid-body.
            if let Some(metrics) = this.metrics.take() {
                ErrorSource::Upstream.count(&metrics, false);
            }
            tracing::warn!(backend = %this.backend, error = %e, "backend response body broke off; the client connection is closed with it");
            this.decoder = Decoder::Done;
            if this.wire.take().is_some() {
                std::mem::replace(&mut this.home, Home::Close).settle(None);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.0.decoder, Decoder::Done | Decoder::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.0.decoder {
            Decoder::Done => SizeHint::with_exact(0),
            Decoder::Length(n) => SizeHint::with_exact(n),
            Decoder::Chunked(_) | Decoder::UntilClose => SizeHint::default(),
        }
    }
}
