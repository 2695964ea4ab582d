//! A backend's response body on its way to the client. When it has been read to the end it hands
//! the shared upstream connection back (to the pool once the request body is sent too); a body
//! dropped half-read closes its connection.
//! A body the backend breaks off (a reset mid-response) counts as an upstream error.
#![forbid(unsafe_code)]

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::uri::Authority;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::pool::Loan;
use crate::{error::ErrorSource, metrics::Metrics};

pub struct GuardedBody {
    inner: Incoming,
    /// The shared connection that carried it, until it goes back to the pool.
    loan: Option<Loan>,
    /// Until the body failed (then it is counted, once).
    metrics: Option<Arc<Metrics>>,
    backend: Authority,
}

impl GuardedBody {
    pub fn new(
        inner: Incoming,
        loan: Option<Loan>,
        metrics: Arc<Metrics>,
        backend: Authority,
    ) -> Self {
        GuardedBody {
            inner,
            loan,
            metrics: Some(metrics),
            backend,
        }
    }
}

impl GuardedBody {
    /// The response is over: the connection goes back (once the request is sent too) if the
    /// response was read to the end (`complete`), and is closed otherwise.
    fn release(&mut self, complete: bool) {
        if let Some(loan) = self.loan.take()
            && complete
        {
            loan.response_done();
        }
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        // An empty body (a 401 without content, a 204) may never be polled.
        let complete = self.inner.is_end_stream();
        self.release(complete);
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
            ErrorSource::Upstream.count(&metrics, false);
            tracing::warn!(backend = %self.backend, error = %e, "backend response body broke off; the client connection is closed with it");
        }
        match &polled {
            Poll::Ready(Some(Err(_))) => self.release(false),
            Poll::Ready(None) => self.release(true),
            _ if self.inner.is_end_stream() => self.release(true),
            _ => {}
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
