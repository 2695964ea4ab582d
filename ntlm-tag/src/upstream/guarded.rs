//! A backend's response body on its way to the client. It holds the backend's upstream-connection
//! permit until it is fully read (the pooled connection is back in the pool by then, so the cap
//! counts connections, not requests), and counts a body the backend breaks off (a reset
//! mid-response) as an upstream error.
#![forbid(unsafe_code)]

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::uri::Authority;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::OwnedSemaphorePermit;

use crate::metrics::Metrics;

pub struct GuardedBody {
    inner: Incoming,
    permit: Option<OwnedSemaphorePermit>,
    /// Until the body failed (then it is counted, once).
    metrics: Option<Arc<Metrics>>,
    backend: Authority,
}

impl GuardedBody {
    pub fn new(
        inner: Incoming,
        permit: Option<OwnedSemaphorePermit>,
        metrics: Arc<Metrics>,
        backend: Authority,
    ) -> Self {
        GuardedBody {
            inner,
            permit,
            metrics: Some(metrics),
            backend,
        }
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
        if let Poll::Ready(Some(Err(e))) = &polled
            && let Some(metrics) = self.metrics.take()
        {
            // Reading the backend's response failed: the backend reset or closed mid-body.
            metrics.upstream_error();
            tracing::warn!(backend = %self.backend, error = %e, "backend response body broke off; the client connection is closed with it");
        }
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
