//! A response body that holds a backend's upstream-connection permit until it is fully read: the
//! pooled connection is back in the pool by then, so the cap counts connections, not requests.
#![forbid(unsafe_code)]

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::OwnedSemaphorePermit;

pub struct GuardedBody {
    inner: Incoming,
    permit: Option<OwnedSemaphorePermit>,
}

impl GuardedBody {
    pub fn new(inner: Incoming, permit: Option<OwnedSemaphorePermit>) -> Self {
        GuardedBody { inner, permit }
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_))))
            || self.inner.is_end_stream()
        {
            self.permit = None;
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
