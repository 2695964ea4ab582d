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

pub struct ClientBody {
    inner: UnsyncBoxBody<Bytes, ClientBodyError>,
    broken: Arc<AtomicBool>,
}

/// Tells how a [`ClientBody`] fared; kept by whoever sent the body.
#[derive(Clone)]
pub struct ClientBodyState {
    broken: Arc<AtomicBool>,
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
        self.broken.load(Ordering::Acquire)
    }
}

impl ClientBody {
    pub fn new<B>(inner: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<ClientBodyError>,
    {
        ClientBody {
            inner: inner.map_err(Into::into).boxed_unsync(),
            broken: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn state(&self) -> ClientBodyState {
        ClientBodyState {
            broken: Arc::clone(&self.broken),
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
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.broken.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
