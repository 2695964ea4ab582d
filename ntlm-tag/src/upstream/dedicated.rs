//! Upstream connections that belong to one client connection: pinned (pin mode) or bound to its
//! NTLM session (bind mode), and the client connection's upstream side that holds them.

use std::sync::Arc;

use http::{Request, Response};

use super::{
    Backend, ClientBody, Mode, Retired, Upstream, UpstreamError,
    backend::Assignment,
    caps,
    connect::{Attempt, Sharing},
    h1::{Home, Slot, SlotError, UpstreamBody},
};
use crate::metrics::{BindTrigger, Metrics, UpstreamUse};

/// An upstream connection that belongs to one client connection: pinned (pin mode) or bound to
/// its NTLM session (bind mode). Dropping it closes the connection.
pub(super) struct Dedicated {
    backend: Arc<Backend>,
    /// The connection, idle in here between requests, out while a response is being read.
    slot: Arc<Slot>,
    link: &'static str,
    /// Age and requests, for `[upstream_caps]`.
    usage: caps::Usage,
    /// Keeps `ntlm_tag_bound_connections` while a bound connection lives.
    _bound: Option<BoundGauge>,
}

/// Counts one bound connection in the metrics while it lives.
struct BoundGauge(Arc<Metrics>);

impl BoundGauge {
    fn new(metrics: &Arc<Metrics>) -> Self {
        metrics.bound_open().inc();
        BoundGauge(Arc::clone(metrics))
    }
}

impl Drop for BoundGauge {
    fn drop(&mut self) {
        self.0.bound_open().dec();
    }
}

/// A client connection's upstream side: its backend and, once it has one, its own connection.
pub struct ClientUpstream {
    pub(super) assignment: Assignment,
    pub(super) mode: Mode,
    pub(super) dedicated: Option<Dedicated>,
    /// NTLM/Negotiate was seen on this client connection's exchanges.
    pub(super) ntlm_seen: bool,
}

impl ClientUpstream {
    pub fn backend(&self) -> &Arc<Backend> {
        self.assignment.backend()
    }

    /// How this client connection's requests reach the backend now: `shared` (the pool), `bound`
    /// (a connection bound to its NTLM session), `pinned`, or `none` (pin mode, nothing sent yet).
    pub fn link(&self) -> &'static str {
        match (&self.dedicated, self.mode) {
            (Some(d), _) => d.link,
            (None, Mode::Pin) => "none",
            (None, Mode::Bind | Mode::Tag) => "shared",
        }
    }

    /// An upstream connection carries this client's NTLM session: the client is never moved
    /// silently to another connection or backend.
    pub(super) fn holds_session(&self) -> bool {
        self.dedicated.is_some() && self.ntlm_seen
    }

    pub(super) fn move_to(&mut self, backend: Arc<Backend>) {
        self.assignment = Assignment::new(backend);
        self.dedicated = None;
    }
}

impl Upstream {
    pub(super) fn bound(
        &self,
        backend: &Arc<Backend>,
        slot: Arc<Slot>,
        trigger: BindTrigger,
    ) -> Dedicated {
        self.metrics.bound(trigger);
        Dedicated {
            backend: Arc::clone(backend),
            slot,
            link: "bound",
            usage: caps::Usage::new(std::time::Instant::now()),
            _bound: Some(BoundGauge::new(&self.metrics)),
        }
    }

    /// A request on the client connection's own upstream connection: its pinned one (pin mode),
    /// or the one bound to its NTLM session (bind mode), which an NTLM/Negotiate leg takes out of
    /// the pool's reach (or opens) before the request goes.
    pub(super) async fn send_dedicated(
        &self,
        state: &mut ClientUpstream,
        req: Request<ClientBody>,
        stamped: &[u8],
    ) -> Attempt<Response<UpstreamBody>> {
        let backend = Arc::clone(state.backend());
        let usable = state
            .dedicated
            .as_ref()
            .is_some_and(|d| Arc::ptr_eq(&d.backend, &backend) && d.slot.is_open());
        if !usable {
            if let Some(lost) = state.dedicated.take()
                && state.ntlm_seen
            {
                return Attempt::Done(Err(UpstreamError::SessionLost {
                    backend: backend.authority.clone(),
                    link: lost.link,
                    timed_out: false,
                }));
            }
            let sharing = match self.mode {
                Mode::Pin => Sharing::Pinned,
                Mode::Bind | Mode::Tag => Sharing::Bound,
            };
            return match self.send_checked_out(&backend, req, stamped, sharing).await {
                Attempt::Done(Ok(mut response)) => {
                    let slot = Slot::busy();
                    response.body_mut().return_to(Home::Own(Arc::clone(&slot)));
                    state.dedicated = Some(match sharing {
                        Sharing::Pinned => Dedicated {
                            backend: Arc::clone(&backend),
                            slot,
                            link: "pinned",
                            usage: caps::Usage::new(std::time::Instant::now()),
                            _bound: None,
                        },
                        Sharing::Bound | Sharing::Shared => {
                            self.bound(&backend, slot, BindTrigger::Request)
                        }
                    });
                    Attempt::Done(Ok(response))
                }
                Attempt::Done(Err(e)) => Attempt::Done(Err(e)),
                Attempt::Unsent(req, e) => Attempt::Unsent(req, e),
            };
        }
        let Some(own) = state.dedicated.as_mut() else {
            return Attempt::Done(Err(UpstreamError::SessionLost {
                backend: backend.authority.clone(),
                link: "pinned",
                timed_out: false,
            }));
        };
        // The previous response on this connection may still be on its way to the client.
        let deadline = self.timeouts.upstream_response;
        let connection = match own.slot.take(deadline).await {
            Ok(connection) => connection,
            Err(SlotError::Closed) => {
                return Attempt::Unsent(
                    Box::new(req),
                    UpstreamError::Exchange {
                        backend: backend.authority.clone(),
                        source: "the upstream connection was closed".into(),
                    },
                );
            }
            Err(SlotError::Busy) => {
                return Attempt::Done(Err(UpstreamError::Timeout {
                    backend: backend.authority.clone(),
                    timeout: deadline,
                }));
            }
        };
        let slot = Arc::clone(&own.slot);
        let attempt = self.send_on(&backend, connection, req, stamped).await;
        match attempt {
            Attempt::Done(Ok(mut response)) => {
                self.metrics.upstream_request(UpstreamUse::Reused);
                response.body_mut().return_to(Home::Own(slot));
                Attempt::Done(Ok(response))
            }
            Attempt::Done(Err(e)) => {
                // The connection went with the failed exchange.
                Home::Own(slot).settle(None);
                self.metrics.upstream_request(UpstreamUse::Reused);
                Attempt::Done(Err(e))
            }
            Attempt::Unsent(req, e) => {
                Home::Own(slot).settle(None);
                Attempt::Unsent(req, e)
            }
        }
    }

    /// Counts a response on the client's own connection against `[upstream_caps]`. At a cap the
    /// connection is let go (it closes once this response has been read) and the response is
    /// marked [`Retired`], so that the client connection closes after it too: the NTLM context
    /// and the client connection that holds it end together, never one without the other.
    pub(super) fn count_dedicated_use(
        &self,
        state: &mut ClientUpstream,
        response: &mut Response<UpstreamBody>,
    ) {
        let now = std::time::Instant::now();
        let Some(own) = state.dedicated.as_mut() else {
            return;
        };
        let Some(cap) = own.usage.record_response(&self.caps, now) else {
            return;
        };
        self.metrics.upstream_retired(cap);
        tracing::info!(
            backend = %own.backend.authority,
            link = own.link,
            cap = cap.as_str(),
            requests = own.usage.requests(),
            age_secs = own.usage.age(now).as_secs_f64(),
            "upstream connection reached its [upstream_caps] cap; closing it and its client \
             connection after this response (the client reconnects and authenticates again)"
        );
        state.dedicated = None;
        response.extensions_mut().insert(Retired(cap));
    }
}
