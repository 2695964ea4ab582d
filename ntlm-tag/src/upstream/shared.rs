//! Requests on the shared pool of keep-alive connections: checkout, send, return (or bind).

use std::sync::Arc;

use http::{Request, Response};

use super::h1::{Home, Slot, UpstreamBody};
use super::{
    ClientBody, ClientUpstream, Mode, Upstream, UpstreamError, binding,
    connect::{Attempt, Sharing},
};
use crate::metrics::BindTrigger;

impl Upstream {
    /// A request on the shared pool. In bind mode a response that shows the connection now holds
    /// an NTLM context binds it to this client connection instead of returning it to the pool.
    pub(super) async fn send_shared(
        &self,
        state: &mut ClientUpstream,
        req: Request<ClientBody>,
        stamped: &[u8],
    ) -> Attempt<Response<UpstreamBody>> {
        let backend = Arc::clone(state.backend());
        // With a cap, wait for one of the backend's connections to be free.
        let permit = match &backend.permits {
            Some(p) => {
                let deadline = self.timeouts.upstream_response;
                match tokio::time::timeout(deadline, Arc::clone(p).acquire_owned()).await {
                    Ok(permit) => permit.ok(),
                    Err(_) => {
                        return Attempt::Done(Err(UpstreamError::Timeout {
                            backend: backend.authority.clone(),
                            timeout: deadline,
                        }));
                    }
                }
            }
            None => None,
        };
        let mut response = match self
            .send_checked_out(&backend, req, stamped, Sharing::Shared)
            .await
        {
            Attempt::Done(Ok(response)) => response,
            Attempt::Done(Err(e)) => return Attempt::Done(Err(e)),
            Attempt::Unsent(req, e) => return Attempt::Unsent(req, e),
        };
        let home = if self.mode == Mode::Bind && binding::response_binds(response.headers()) {
            tracing::debug!(backend = %backend.authority, status = response.status().as_u16(), "the response shows an NTLM/Negotiate context on its upstream connection; binding it to the client connection");
            state.ntlm_seen = true;
            let slot = Slot::busy();
            state.dedicated = Some(self.bound(&backend, Arc::clone(&slot), BindTrigger::Response));
            Home::Own(slot)
        } else {
            Home::Pool {
                backend: Arc::clone(&backend),
                permit,
            }
        };
        response.body_mut().return_to(home);
        Attempt::Done(Ok(response))
    }
}
