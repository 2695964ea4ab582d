//! A request body read from the client connection by its framing, as the upstream side polls it.
//!
//! The body owns the connection's read side while it is under way and hands it back to the
//! server when it ends (read to its end, broken, or dropped): the server reads the next request
//! only from a connection whose last body ended cleanly, and closes it otherwise. A body dropped
//! unread is skipped if all of it has already arrived, as hyper does.
//!
//! `Expect: 100-continue`: the first poll asks the server to send `100 Continue`, unless the
//! response has begun by then.
#![forbid(unsafe_code)]

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, SizeHint};
use thiserror::Error;
use tokio::sync::{Notify, oneshot};

use super::{
    chunked::{ChunkError, ChunkedDecoder, Decoded},
    reader::Reader,
};

#[derive(Debug, Error)]
pub enum BodyError {
    #[error("invalid chunked body: {0}")]
    Chunked(#[from] ChunkError),
    #[error("the client closed the connection before the end of the request body")]
    Truncated,
    #[error("reading the request body: {0}")]
    Io(#[from] std::io::Error),
}

/// The read side handed back to the server when a body ends.
pub struct Returned {
    pub reader: Reader,
    /// The body ended where its framing says: the next bytes are the next request.
    pub clean: bool,
}

enum Remaining {
    Length(u64),
    Chunked(ChunkedDecoder),
}

pub struct H1Body {
    /// `None` for a request without a body, and once the body has ended.
    reader: Option<Reader>,
    remaining: Remaining,
    back: Option<oneshot::Sender<Returned>>,
    expect: Option<Arc<ContinueGate>>,
}

impl H1Body {
    /// A request without a body.
    pub fn empty() -> Self {
        H1Body {
            reader: None,
            remaining: Remaining::Length(0),
            back: None,
            expect: None,
        }
    }

    /// A body of `length` bytes (more than 0), or chunked when `None`.
    pub fn new(
        reader: Reader,
        length: Option<u64>,
        back: oneshot::Sender<Returned>,
        expect: Option<Arc<ContinueGate>>,
    ) -> Self {
        H1Body {
            reader: Some(reader),
            remaining: match length {
                Some(n) => Remaining::Length(n),
                None => Remaining::Chunked(ChunkedDecoder::new()),
            },
            back: Some(back),
            expect,
        }
    }

    fn hand_back(&mut self, clean: bool) {
        if let (Some(reader), Some(back)) = (self.reader.take(), self.back.take()) {
            // The server may be gone already (it closed): the reader then closes with this body.
            let _ = back.send(Returned { reader, clean });
        }
    }

    /// The next frame from what is buffered; `None`: more bytes are needed.
    fn decode_buffered(&mut self) -> Option<Result<Option<Frame<Bytes>>, BodyError>> {
        let reader = self.reader.as_mut()?;
        match &mut self.remaining {
            Remaining::Length(0) => Some(Ok(None)),
            Remaining::Length(_) if reader.buf.is_empty() => None,
            Remaining::Length(left) => {
                let n = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(reader.buf.len());
                *left -= n as u64;
                Some(Ok(Some(Frame::data(reader.buf.split_to(n).freeze()))))
            }
            Remaining::Chunked(decoder) => match decoder.decode(&mut reader.buf) {
                Ok(Decoded::Data(data)) => Some(Ok(Some(Frame::data(data)))),
                Ok(Decoded::End(trailers)) if trailers.is_empty() => Some(Ok(None)),
                Ok(Decoded::End(trailers)) => Some(Ok(Some(Frame::trailers(trailers)))),
                Ok(Decoded::NeedMore) => None,
                Err(e) => Some(Err(e.into())),
            },
        }
    }

    fn ended(&self) -> bool {
        match &self.remaining {
            Remaining::Length(n) => *n == 0,
            Remaining::Chunked(d) => d.is_done(),
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(gate) = self.expect.take() {
            gate.want();
        }
        loop {
            if self.reader.is_none() {
                return Poll::Ready(None);
            }
            if let Some(decoded) = self.decode_buffered() {
                return Poll::Ready(match decoded {
                    Ok(Some(frame)) => {
                        if self.ended() {
                            self.hand_back(true);
                        }
                        Some(Ok(frame))
                    }
                    Ok(None) => {
                        self.hand_back(true);
                        None
                    }
                    Err(e) => {
                        self.hand_back(false);
                        Some(Err(e))
                    }
                });
            }
            let Some(reader) = self.reader.as_mut() else {
                return Poll::Ready(None);
            };
            match reader.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    self.hand_back(false);
                    return Poll::Ready(Some(Err(BodyError::Truncated)));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    self.hand_back(false);
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reader.is_none() || self.ended()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.reader, &self.remaining) {
            (None, _) => SizeHint::with_exact(0),
            (Some(_), Remaining::Length(n)) => SizeHint::with_exact(*n),
            (Some(_), Remaining::Chunked(_)) => SizeHint::default(),
        }
    }
}

impl Drop for H1Body {
    fn drop(&mut self) {
        if self.reader.is_none() {
            return;
        }
        // Dropped before its end: skip it if the rest has already arrived, without waiting.
        let clean = match &mut self.remaining {
            Remaining::Length(left) => {
                let buffered = self.reader.as_ref().map_or(0, |r| r.buf.len() as u64);
                if buffered >= *left {
                    if let Some(r) = self.reader.as_mut() {
                        r.buf.advance(usize::try_from(*left).unwrap_or(usize::MAX));
                    }
                    true
                } else {
                    false
                }
            }
            Remaining::Chunked(_) => loop {
                match self.decode_buffered() {
                    Some(Ok(Some(_))) => {}
                    Some(Ok(None)) => break true,
                    Some(Err(_)) | None => break false,
                }
            },
        };
        self.hand_back(clean);
    }
}

/// `Expect: 100-continue` between the body (which asks for it) and the server (which sends it
/// unless the response has begun).
pub struct ContinueGate {
    state: AtomicU8,
    wanted: Notify,
}

const WAITING: u8 = 0;
const WANTED: u8 = 1;
const SETTLED: u8 = 2;

impl ContinueGate {
    pub fn new() -> Arc<Self> {
        Arc::new(ContinueGate {
            state: AtomicU8::new(WAITING),
            wanted: Notify::new(),
        })
    }

    fn want(&self) {
        if self
            .state
            .compare_exchange(WAITING, WANTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.wanted.notify_one();
        }
    }

    /// Resolves when the body asks for `100 Continue`, once.
    pub async fn wanted(&self) {
        loop {
            if self.state.load(Ordering::Acquire) == WANTED {
                return;
            }
            self.wanted.notified().await;
        }
    }

    /// Whether `100 Continue` is to be sent now (it was asked for and not yet settled).
    pub fn take_wanted(&self) -> bool {
        self.state
            .compare_exchange(WANTED, SETTLED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The response begins: no `100 Continue` after it.
    pub fn settle(&self) {
        self.state.store(SETTLED, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn reader(bytes: &'static [u8]) -> Reader {
        Reader::new(
            super::super::reader::ReadIo::Boxed(Box::new(bytes)),
            bytes::BytesMut::new(),
        )
    }

    #[tokio::test]
    async fn a_chunked_body_is_read_to_its_end_and_the_next_request_handed_back() {
        let (tx, rx) = oneshot::channel();
        let body = H1Body::new(
            reader(b"5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n"),
            None,
            tx,
            None,
        );
        let collected = body.collect().await.expect("valid").to_bytes();
        assert_eq!(&collected[..], b"hello");
        let returned = rx.await.expect("handed back");
        assert!(returned.clean);
        assert!(returned.reader.buf.starts_with(b"GET /"));
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_not_clean() {
        let (tx, rx) = oneshot::channel();
        let body = H1Body::new(reader(b"hel"), Some(5), tx, None);
        assert!(matches!(body.collect().await, Err(BodyError::Truncated)));
        assert!(!rx.await.expect("handed back").clean);
    }

    #[tokio::test]
    async fn a_body_dropped_unread_is_skipped_only_when_it_has_all_arrived() {
        let (tx, rx) = oneshot::channel();
        let mut r = reader(b"");
        r.buf.extend_from_slice(b"helloNEXT");
        drop(H1Body::new(r, Some(5), tx, None));
        let returned = rx.await.expect("handed back");
        assert!(returned.clean);
        assert_eq!(&returned.reader.buf[..], b"NEXT");

        let (tx, rx) = oneshot::channel();
        let mut r = reader(b"");
        r.buf.extend_from_slice(b"hel");
        drop(H1Body::new(r, Some(5), tx, None));
        assert!(!rx.await.expect("handed back").clean);
    }
}
