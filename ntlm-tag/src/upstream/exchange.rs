//! One request's way to a backend: route, affinity, failover of unsent requests, and what the
//! outcome means for the client connection's NTLM session.

use std::{net::IpAddr, sync::Arc};

use http::{HeaderMap, Request, Response, StatusCode, header};

use super::epa_diagnosis::{BackendView, BindingClaim, Diagnosis, diagnose};
use super::tls::BackendTls;
use super::{
    Backend, ClientBody, ClientBodyState, ClientUpstream, Mode, Upstream, UpstreamBody,
    UpstreamError, binding,
    connect::{Attempt, to_origin_form},
};
use crate::ntlm::{is_ntlm_challenge, is_ntlm_request};
use crate::present_fields::PresentFields;

/// A request that asks to switch protocols (`Connection: upgrade` with `Upgrade`, e.g. WebSocket):
/// it goes on an upstream connection of its own, which becomes the client's tunnel after a `101`
/// and is never pooled.
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

impl Upstream {
    /// Sends one (already rewritten) request for a client connection and returns the response.
    /// `stamped` is the header lines the gateway adds, encoded, written after the request's own.
    ///
    /// A request that never reached its backend goes to another healthy one (each backend once),
    /// and the client connection's affinity moves with it, unless an upstream connection holds the
    /// client's NTLM session. A request that may have reached a backend is never sent again.
    pub async fn exchange(
        &self,
        state: &mut ClientUpstream,
        client: IpAddr,
        mut req: Request<ClientBody>,
        stamped: &[u8],
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let client_body = req.body().state();
        let present = PresentFields::of(req.headers());
        let epa_claim = present
            .authorization
            .then(|| BindingClaim::from_headers(req.headers()))
            .flatten();
        if let Some(claim) = &epa_claim {
            tracing::debug!(%claim, "NTLMv2 Type3 Extended Protection fields");
        }
        let binds = self.mode == Mode::Bind
            && (present.authorization || present.proxy_authorization)
            && binding::request_binds(req.headers());
        if binds || (present.authorization && is_ntlm_request(req.headers())) {
            state.ntlm_seen = true;
        }
        let upgrade = present.upgrade && is_upgrade_request(req.headers());
        // Whether this request goes on a connection of the client's own (pinned or bound). An
        // upgrade always does: after a 101 its connection is the client's tunnel, never pooled.
        let dedicated = upgrade
            || match self.mode {
                Mode::Pin => true,
                Mode::Bind => binds || state.dedicated.is_some(),
                Mode::Tag => false,
            };
        let had_host = present.host;
        let pool = self.routes.route(req.uri().path());
        if state.holds_session() {
            // The session cannot move: its connection serves every route its backend serves.
            if !pool.serves(state.backend()) {
                return Err(UpstreamError::Misdirected {
                    route: pool.name().to_string(),
                    backend: state.backend().authority.clone(),
                });
            }
        } else if !pool.is_up_on(state.backend()) {
            let old = Arc::clone(state.backend());
            let new = self.choose(pool, client, std::slice::from_ref(&old));
            if !Arc::ptr_eq(&new, &old) {
                tracing::info!(route = pool.name(), from = %old.authority, to = %new.authority, "backend down or not serving this route; moving the client connection");
                state.move_to(new);
            }
        }
        let mut tried: Vec<Arc<Backend>> = Vec::new();
        let (backend, result) = loop {
            let backend = Arc::clone(state.backend());
            if let Err(e) = to_origin_form(&mut req, &backend) {
                break (backend, Err(e));
            }
            let attempt = if dedicated {
                self.send_dedicated(state, req, stamped).await
            } else {
                self.send_shared(state, req, stamped).await
            };
            match attempt {
                Attempt::Done(result) => break (backend, result),
                Attempt::Unsent(_, error @ UpstreamError::GatewayResources { .. }) => {
                    // The gateway's own shortage: the backend is fine (it stays in rotation), and
                    // another backend would fail the same way.
                    break (backend, Err(error));
                }
                Attempt::Unsent(unsent, error) => {
                    if matches!(
                        error,
                        UpstreamError::Connect { .. }
                            | UpstreamError::Tls { .. }
                            | UpstreamError::ConnectTimeout { .. }
                    ) {
                        self.mark_down(&backend);
                    }
                    tried.push(Arc::clone(&backend));
                    // A client whose NTLM session lives on an upstream connection stays with it.
                    let next = if state.holds_session() {
                        None
                    } else {
                        self.pick(pool, client, &tried)
                    };
                    let Some(next) = next else {
                        break (backend, Err(error));
                    };
                    tracing::info!(
                        from = %backend.authority,
                        to = %next.authority,
                        error = %crate::error::error_chain(&error),
                        "the request never reached the backend; sending it to another one and moving the client connection there"
                    );
                    self.metrics.upstream_failover();
                    state.move_to(next);
                    req = *unsent;
                    if !had_host {
                        // to_origin_form set the previous backend's name.
                        req.headers_mut().remove(header::HOST);
                    }
                }
            }
        };
        let mut result = self.settle(state, &backend, dedicated, &client_body, result);
        if dedicated && let Ok(response) = &mut result {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                // The connection now carries the tunnel, and closes with it.
                state.dedicated = None;
            } else {
                self.count_dedicated_use(state, response);
            }
        }
        if let (Ok(response), Some(claim)) = (&result, &epa_claim)
            && response.status() == StatusCode::UNAUTHORIZED
            && claim.is_bound()
        {
            self.explain_epa_refusal(&backend, claim);
        }
        result
    }

    /// Health, NTLM bookkeeping and error classification after the last attempt.
    pub(super) fn settle(
        &self,
        state: &mut ClientUpstream,
        backend: &Arc<Backend>,
        dedicated: bool,
        client_body: &ClientBodyState,
        result: Result<Response<UpstreamBody>, UpstreamError>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        if client_body.is_broken() {
            // Whatever the upstream side made of it, the request was cut off by the client. A
            // dedicated connection that carried part of it is never reused (its exchange closed it).
            if dedicated {
                state.dedicated = None;
            }
            if let Err(e) = result {
                return Err(match e {
                    UpstreamError::BadTarget(_) | UpstreamError::ClientBody { .. } => e,
                    other => UpstreamError::ClientBody {
                        source: Box::new(other),
                    },
                });
            }
        }
        match &result {
            Ok(response) => {
                backend.health.record_success();
                if is_ntlm_challenge(response) {
                    state.ntlm_seen = true;
                }
            }
            Err(UpstreamError::Timeout { .. }) => self.mark_down(backend),
            Err(_) => {}
        }
        // A failed exchange on a connection of the client's own that carried NTLM ends the
        // session: the client connection is closed with it, never continued on a fresh upstream
        // connection.
        if dedicated
            && state.ntlm_seen
            && matches!(
                result,
                Err(UpstreamError::Exchange { .. } | UpstreamError::Timeout { .. })
            )
        {
            let link = match self.mode {
                Mode::Pin => "pinned",
                Mode::Bind | Mode::Tag => "bound",
            };
            state.dedicated = None;
            return Err(UpstreamError::SessionLost {
                backend: backend.authority.clone(),
                link,
                timed_out: matches!(result, Err(UpstreamError::Timeout { .. })),
            });
        }
        result
    }

    /// A backend answered 401 to a Type3 with a channel binding: log and count why.
    pub(super) fn explain_epa_refusal(&self, backend: &Backend, claim: &BindingClaim) {
        let leaf = backend.last_leaf.lock().ok().and_then(|l| l.clone());
        let view = BackendView {
            tls_server_name: backend.tls.as_ref().map(BackendTls::server_name),
            leaf: leaf.as_deref(),
        };
        let Diagnosis { cause, advice } = diagnose(claim, &view);
        self.metrics.epa_refused(cause);
        tracing::warn!(
            backend = %backend.authority,
            cause = cause.name(),
            %claim,
            "Extended Protection: the backend refused a login bound to a TLS channel: {advice}"
        );
    }

    pub(super) fn mark_down(&self, backend: &Backend) {
        let backoff = backend.health.record_failure();
        tracing::warn!(backend = %backend.authority, backoff_secs = backoff.as_secs_f64(), "backend marked down");
    }
}
