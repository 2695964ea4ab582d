//! A client's request body on its way upstream, remembering whether *the client's* side of it broke
//! (an invalid chunk size, a connection closed mid-body). When the upstream exchange then fails, the
//! failure is the client's: a 400 and a closed client connection, not a 502 counted against the
//! backend.
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
use hyper::body::{Body, Frame, Incoming, SizeHint};

pub struct ClientBody {
    inner: Incoming,
    broken: Arc<AtomicBool>,
}

/// Tells whether a [`ClientBody`] failed on the client's side; kept by whoever sent the body.
#[derive(Clone, Debug, Default)]
pub struct ClientBodyState {
    broken: Arc<AtomicBool>,
}

impl ClientBodyState {
    /// Reading the client's body failed: the request it belongs to is the client's fault.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }
}

impl ClientBody {
    pub fn new(inner: Incoming) -> Self {
        ClientBody {
            inner,
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
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(Some(Err(_)))) {
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
