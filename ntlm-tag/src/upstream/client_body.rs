//! A client's request body on its way upstream, remembering whether *the client's* side of it broke
//! (an invalid chunk size, a connection closed mid-body) and whether it was sent to its end.
//!
//! When the upstream exchange fails after the client's side broke, the failure is the client's: a
//! 400 and a closed client connection, not a 502 counted against the backend.
//!
//! A shared upstream connection is free for the next request only when both directions are done.
//! Backends answer an unauthenticated POST with 401 before reading its body (normal for NTLM), so
//! the response often ends first: the connection then waits here, out of the pool, until the body
//! has been sent, and is closed if the client abandons the body instead.
#![forbid(unsafe_code)]

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{BodyExt, combinators::UnsyncBoxBody};
use hyper::body::{Body, Frame, SizeHint};

use super::pool::Loan;

/// Why reading the client's body failed (its server's error, boxed: HTTP/1.x or HTTP/2).
pub type ClientBodyError = Box<dyn std::error::Error + Send + Sync>;

pub struct ClientBody {
    inner: UnsyncBoxBody<Bytes, ClientBodyError>,
    shared: Arc<Shared>,
}

/// Tells how a [`ClientBody`] fared; kept by whoever sent the body.
#[derive(Clone)]
pub struct ClientBodyState {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ClientBodyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBodyState")
            .field("broken", &self.is_broken())
            .finish_non_exhaustive()
    }
}

struct Shared {
    broken: AtomicBool,
    progress: Mutex<Progress>,
}

enum Progress {
    /// Still on its way; holds the shared connection carrying it if its response ended first.
    Sending(Option<Loan>),
    /// Handed to the upstream connection to its end.
    Sent,
    /// Dropped before its end: the client broke or abandoned it, or it was never sent.
    Abandoned,
}

impl ClientBodyState {
    /// Reading the client's body failed: the request it belongs to is the client's fault.
    pub fn is_broken(&self) -> bool {
        self.shared.broken.load(Ordering::Acquire)
    }

    /// The response on `loan`'s connection has been read to its end: the connection goes back to
    /// the pool as soon as this body has been sent too, and is closed if the body is abandoned.
    pub(super) fn give_back_when_sent(&self, loan: Loan) {
        let Ok(mut progress) = self.shared.progress.lock() else {
            return; // Poisoned: drop the loan, which closes the connection.
        };
        match &mut *progress {
            Progress::Sending(parked) => *parked = Some(loan),
            Progress::Sent => {
                drop(progress);
                loan.give_back();
            }
            Progress::Abandoned => drop(loan),
        }
    }
}

impl Shared {
    fn finish(&self, sent: bool) {
        let parked = match self.progress.lock() {
            Ok(mut progress) => {
                let next = if sent {
                    Progress::Sent
                } else {
                    Progress::Abandoned
                };
                match std::mem::replace(&mut *progress, next) {
                    Progress::Sending(parked) => parked,
                    _ => None,
                }
            }
            Err(_) => None,
        };
        if let Some(loan) = parked
            && sent
        {
            loan.give_back();
        }
        // An abandoned body's parked connection is dropped here: closed, never pooled.
    }
}

impl ClientBody {
    pub fn new<B>(inner: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<ClientBodyError>,
    {
        let inner = inner.map_err(Into::into).boxed_unsync();
        // A request without a body (a GET) is complete once its head is written.
        let progress = if inner.is_end_stream() {
            Progress::Sent
        } else {
            Progress::Sending(None)
        };
        ClientBody {
            inner,
            shared: Arc::new(Shared {
                broken: AtomicBool::new(false),
                progress: Mutex::new(progress),
            }),
        }
    }

    pub fn state(&self) -> ClientBodyState {
        ClientBodyState {
            shared: Arc::clone(&self.shared),
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
        match &polled {
            Poll::Ready(Some(Err(_))) => {
                self.shared.broken.store(true, Ordering::Release);
                self.shared.finish(false);
            }
            Poll::Ready(None) => self.shared.finish(true),
            // hyper stops polling once the body says it has ended.
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.shared.finish(true),
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

impl Drop for ClientBody {
    fn drop(&mut self) {
        // hyper drops a body it has seen end without polling it again; any other drop abandons it.
        let sent = self.inner.is_end_stream() && !self.shared.broken.load(Ordering::Acquire);
        let unfinished = matches!(
            self.shared.progress.lock().as_deref(),
            Ok(Progress::Sending(_))
        );
        if unfinished {
            self.shared.finish(sent);
        }
    }
}
