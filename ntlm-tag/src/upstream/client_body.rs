//! A client's request body on its way upstream, remembering whether *the client's* side of it broke
//! (an invalid chunk size, a connection closed mid-body).
//!
//! When the upstream exchange fails after the client's side broke, the failure is the client's: a
//! 400 and a closed client connection, not a 502 counted against the backend.
#![forbid(unsafe_code)]

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{BodyExt, combinators::UnsyncBoxBody};
use hyper::body::{Body, Frame, SizeHint};

/// Why reading the client's body failed (its server's error, boxed: HTTP/1.x or HTTP/2).
pub type ClientBodyError = Box<dyn std::error::Error + Send + Sync>;

/// `None`: a body that has ended before it started (most requests: GET, HEAD), which can neither
/// yield data nor break, so it costs neither the box nor the shared flag.
pub struct ClientBody(Option<Streaming>);

struct Streaming {
    inner: UnsyncBoxBody<Bytes, ClientBodyError>,
    broken: Arc<AtomicBool>,
}

/// Tells how a [`ClientBody`] fared; kept by whoever sent the body.
#[derive(Clone)]
pub struct ClientBodyState {
    broken: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for ClientBodyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBodyState")
            .field("broken", &self.is_broken())
            .finish_non_exhaustive()
    }
}

impl ClientBodyState {
    /// Reading the client's body failed: the request it belongs to is the client's fault.
    pub fn is_broken(&self) -> bool {
        self.broken
            .as_ref()
            .is_some_and(|b| b.load(Ordering::Acquire))
    }
}

impl ClientBody {
    pub fn new<B>(inner: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<ClientBodyError>,
    {
        if inner.is_end_stream() {
            return ClientBody(None);
        }
        ClientBody(Some(Streaming {
            inner: inner.map_err(Into::into).boxed_unsync(),
            broken: Arc::new(AtomicBool::new(false)),
        }))
    }

    pub fn state(&self) -> ClientBodyState {
        ClientBodyState {
            broken: self.0.as_ref().map(|s| Arc::clone(&s.broken)),
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let Some(streaming) = &mut self.0 else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut streaming.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            streaming.broken.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(|s| s.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.0
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |s| s.inner.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};

    /// One byte of data, then the client's side breaks.
    struct BreaksAfterOneByte(bool);

    impl Body for BreaksAfterOneByte {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            if self.0 {
                return Poll::Ready(Some(Err(std::io::Error::other("cut off"))));
            }
            self.0 = true;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"a")))))
        }
    }

    #[tokio::test]
    async fn an_ended_body_is_empty_and_never_broken() {
        let body = ClientBody::new(Empty::<Bytes>::new());
        let state = body.state();
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
        let collected = body.collect().await.expect("empty").to_bytes();
        assert!(collected.is_empty());
        assert!(!state.is_broken());
    }

    #[tokio::test]
    async fn a_body_with_data_passes_it_and_reports_a_break() {
        let body = ClientBody::new(Full::new(Bytes::from_static(b"abc")));
        assert_eq!(body.size_hint().exact(), Some(3));
        let collected = body.collect().await.expect("whole").to_bytes();
        assert_eq!(&collected[..], b"abc");

        let body = ClientBody::new(BreaksAfterOneByte(false));
        let state = body.state();
        assert!(body.collect().await.is_err());
        assert!(state.is_broken());
    }
}
