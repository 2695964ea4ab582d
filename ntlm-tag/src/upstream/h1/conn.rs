//! An upstream HTTP/1.1 connection: the stream and the bytes read ahead of the parser, with no
//! task of its own. Between requests it waits in a home: the backend's pool, or the slot of the
//! client connection it belongs to (pinned or bound).
#![forbid(unsafe_code)]

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, ReadBuf},
    sync::{Notify, OwnedSemaphorePermit},
};

use crate::metrics::Metrics;
use crate::upstream::{Backend, connect::BackendIo};

/// Bytes asked of the stream per read.
const READ_CHUNK: usize = 8 * 1024;

pub struct Connection {
    pub(super) io: BackendIo,
    /// Bytes read and not yet parsed: empty between responses on a healthy connection.
    pub(super) read: BytesMut,
    /// Keeps `ntlm_tag_pinned_connections` while a pinned connection lives.
    _pinned: Option<PinnedGauge>,
}

impl Connection {
    pub fn new(io: BackendIo) -> Self {
        Connection {
            io,
            read: BytesMut::new(),
            _pinned: None,
        }
    }

    /// Counts this connection as pinned while it lives.
    pub fn pinned(mut self, metrics: &Arc<Metrics>) -> Self {
        metrics.pinned_open().inc();
        self._pinned = Some(PinnedGauge(Arc::clone(metrics)));
        self
    }

    /// Whether an idle connection can take a request: the backend has neither closed it nor sent
    /// anything unasked. One read that does not wait (hyper's connection task saw the same as it
    /// happened; this connection has no task, so it looks when it is about to be used).
    pub fn is_reusable(&mut self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut buf),
            Poll::Pending
        )
    }

    /// Reads more bytes into the buffer; `Ok(0)`: the backend closed the connection.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        self.read.reserve(READ_CHUNK);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
    }

    /// Lets the read buffer go (it is empty between responses).
    fn without_buffer(mut self) -> Self {
        if self.read.is_empty() {
            self.read = BytesMut::new();
        }
        self
    }

    /// The stream and what was read ahead of it, for a tunnel after `101 Switching Protocols`.
    pub fn into_parts(self) -> (BackendIo, BytesMut) {
        (self.io, self.read)
    }
}

struct PinnedGauge(Arc<Metrics>);

impl Drop for PinnedGauge {
    fn drop(&mut self) {
        self.0.pinned_open().dec();
    }
}

/// Where a connection goes once its exchange is over (the response read to its end and the
/// request sent whole): it is closed instead whenever it is not, or the backend asked to close.
pub enum Home {
    /// Closed after this exchange (a connection let go at a cap, or whose use is decided later).
    Close,
    /// Back to the backend's pool of shared connections; the permit is the backend's connection
    /// cap, held while the connection is busy.
    Pool {
        backend: Arc<Backend>,
        permit: Option<OwnedSemaphorePermit>,
    },
    /// Back to the client connection it belongs to.
    Own(Arc<Slot>),
}

impl Home {
    /// The exchange is over: `Some` connection goes home, `None` (it could not be reused) is gone.
    pub fn settle(self, connection: Option<Connection>) {
        match (self, connection) {
            (Home::Pool { backend, permit }, Some(connection)) => {
                backend.idle.put(connection);
                drop(permit);
            }
            (Home::Own(slot), connection) => {
                // A client's own connection may wait for hours (an idle Outlook session): it
                // keeps no read buffer meanwhile.
                slot.settle(connection.map(Connection::without_buffer));
            }
            (Home::Close | Home::Pool { .. }, _) => {}
        }
    }
}

/// The connection of one client connection (pinned or bound): idle in here between its requests,
/// out while an exchange has it.
pub struct Slot {
    state: Mutex<SlotState>,
    changed: Notify,
}

enum SlotState {
    Idle(Connection),
    Busy,
    Closed,
}

/// Why a slot gave no connection.
#[derive(Debug, PartialEq, Eq)]
pub enum SlotError {
    /// The connection is gone: the backend closed it, or its last exchange did not end cleanly.
    Closed,
    /// The previous exchange still has it after the deadline.
    Busy,
}

impl Slot {
    /// A slot whose connection is out on its first exchange.
    pub fn busy() -> Arc<Self> {
        Arc::new(Slot {
            state: Mutex::new(SlotState::Busy),
            changed: Notify::new(),
        })
    }

    /// False once the connection is gone (or, idle, found closed by the backend); a busy one may
    /// still come back.
    pub fn is_open(&self) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        let open = match &mut *state {
            SlotState::Idle(connection) => connection.is_reusable(),
            SlotState::Busy => true,
            SlotState::Closed => false,
        };
        if !open {
            *state = SlotState::Closed;
        }
        open
    }

    /// Takes the connection out for an exchange, waiting up to `deadline` for the previous one to
    /// give it back.
    pub async fn take(&self, deadline: Duration) -> Result<Connection, SlotError> {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                {
                    let Ok(mut state) = self.state.lock() else {
                        return Err(SlotError::Closed);
                    };
                    match std::mem::replace(&mut *state, SlotState::Busy) {
                        SlotState::Idle(mut connection) => {
                            if connection.is_reusable() {
                                return Ok(connection);
                            }
                            *state = SlotState::Closed;
                            return Err(SlotError::Closed);
                        }
                        SlotState::Closed => {
                            *state = SlotState::Closed;
                            return Err(SlotError::Closed);
                        }
                        SlotState::Busy => {}
                    }
                }
                changed.await;
            }
        };
        tokio::time::timeout(deadline, wait)
            .await
            .unwrap_or(Err(SlotError::Busy))
    }

    fn settle(&self, connection: Option<Connection>) {
        if let Ok(mut state) = self.state.lock() {
            *state = match connection {
                Some(connection) => SlotState::Idle(connection),
                None => SlotState::Closed,
            };
        }
        self.changed.notify_waiters();
    }
}
