//! One request: checks, stamping, the exchange with the backend, and what its answer means for
//! the connection's auth state; every response counted and logged.

use std::{sync::Arc, time::Instant};

use http::{Request, Response, StatusCode, Version};
use http_body_util::Either;
use hyper::body::Incoming;

use super::{
    ClientConnection, ProxyBody,
    access_log::{AccessRecord, LoggedBody},
    failure::{Closes, Failure, fail, gateway_response},
    request_body::RequestBody,
    rewrite, upgrade,
};
use crate::{
    guard::{Leg, Verdict},
    metrics::HandshakeResult,
    present_fields::PresentFields,
    upstream::{Backend, ClientBody, ResponseTimeout, Retired},
};

/// NTLM authenticates a TCP connection; HTTP/2 multiplexes requests of many contexts on one. Like
/// IIS, answer an NTLM/Negotiate exchange on an HTTP/2 stream with HTTP_1_1_REQUIRED, and clients
/// retry over HTTP/1.1. (HTTP/1.x requests come to [`forward`] from the gateway's own server.)
pub(super) async fn handle(
    req: Request<Incoming>,
    connection: &ClientConnection,
) -> Result<Response<LoggedBody>, h2::Error> {
    if req.version() == Version::HTTP_2 && crate::ntlm::is_ntlm_request(req.headers()) {
        tracing::debug!(conn = %connection.conn, "NTLM over HTTP/2: answering HTTP_1_1_REQUIRED");
        return Err(h2::Error::from(h2::Reason::HTTP_1_1_REQUIRED));
    }
    let (mut parts, body) = forward(req.map(RequestBody::H2), connection)
        .await
        .into_parts();
    // hyper's HTTP/2 server writes the header map: the fields passed as lines join it.
    if let Some(passed) = body.passed_fields() {
        passed.merge_into(&mut parts.headers);
    }
    Ok(Response::from_parts(parts, body))
}

/// Forwards one request to the connection's backend, stamped with the connection id; every
/// response, the backend's or the gateway's own, is counted and gets an access line.
pub(super) async fn forward(
    req: Request<RequestBody>,
    connection: &ClientConnection,
) -> Response<LoggedBody> {
    let gateway = &connection.gateway;
    let started = Instant::now();
    connection.registration.count_request();
    let mut record = connection.live.access_log.then(|| {
        AccessRecord::request(
            connection.conn.hash(),
            connection.full_id.as_deref(),
            connection.client,
            (req.method(), req.uri(), req.version(), req.headers()),
            started,
        )
    });
    let (response, backend) = respond(req, connection, record.as_mut()).await;
    let status = response.status().as_u16();
    // Responses made before a backend was chosen count under backend "-", as in the access log.
    match &backend {
        Some(backend) => gateway
            .metrics
            .response(backend.responses(), status, started.elapsed()),
        None => gateway.metrics.request("-", status, started.elapsed()),
    }
    if let Some(record) = &mut record {
        record.status(status);
        let auth = connection.registration.auth();
        record.auth(auth.name(), auth.user());
    }
    response.map(|body| LoggedBody::new(body, record))
}

/// The response to one request, and the backend that was asked (`None` when the gateway answered
/// without one).
pub(super) async fn respond(
    mut req: Request<RequestBody>,
    connection: &ClientConnection,
    record: Option<&mut AccessRecord>,
) -> (Response<ProxyBody>, Option<Arc<Backend>>) {
    let gateway = &connection.gateway;
    let live = &connection.live;
    // The HTTP/1.x server bounds the head as received; this bounds an HTTP/2 request's too.
    let head_size = match req.body() {
        RequestBody::H1(_) => 0,
        RequestBody::H2(_) => {
            let uri = req.uri();
            uri.scheme_str().map_or(0, |s| s.len() + 3)
                + uri.authority().map_or(0, |a| a.as_str().len())
                + uri.path_and_query().map_or(0, |p| p.as_str().len())
                + req
                    .headers()
                    .iter()
                    .map(|(k, v)| k.as_str().len() + v.len() + 4)
                    .sum::<usize>()
        }
    };
    if head_size > live.limits.max_header_bytes {
        let limit = live.limits.max_header_bytes;
        return (
            fail(connection, Failure::HeadTooLarge { head_size, limit }),
            None,
        );
    }
    let present = PresentFields::of(req.headers());
    if present.transfer_encoding
        && let Some(codings) = rewrite::unsupported_transfer_coding(req.headers())
    {
        // Forwarding would drop the coding (each hop is framed anew, chunked) and pass coded bytes
        // on as content: 501 (RFC 9112 §6.1), and the unread body ends the connection.
        return (fail(connection, Failure::TransferCoding(&codings)), None);
    }
    if present.authorization
        && let Some(m) = crate::metrics::NtlmMessage::of_request(req.headers())
    {
        gateway.metrics.ntlm_message(m);
    }
    // What this request's token means for the connection's auth state and the lockout guard.
    let leg = present
        .authorization
        .then(|| crate::ntlm::client_token(req.headers()).map(|t| Leg::of(&t)))
        .flatten();
    if leg.is_some() {
        connection.handshake_began();
    }
    if let Some(account) = leg.as_ref().and_then(Leg::account)
        && let Some(refusal) = refuse_locked_out(connection, account)
    {
        return (refusal, None);
    }
    let upgrade_to = (present.upgrade && req.version() == Version::HTTP_11)
        .then(|| upgrade::requested(req.headers()))
        .flatten();
    let mut client_upgrade = upgrade_to.is_some().then(|| upgrade::client_side(&mut req));
    if let Some(deadline) = live.route_timeouts.response_for(req.uri().path()) {
        req.extensions_mut().insert(ResponseTimeout(deadline));
    }
    let (mut parts, body) = req.into_parts();
    parts.version = Version::HTTP_11;
    rewrite::prepare_request(&mut parts.headers, &gateway.policy);
    if let Some(protocol) = upgrade_to {
        upgrade::restore(&mut parts.headers, protocol);
    }
    let upstream_req = Request::from_parts(parts, ClientBody::new(body));
    let mut upstream = connection.upstream.lock().await;
    let asked = Instant::now();
    let result = live
        .upstream
        .exchange(
            &mut upstream,
            connection.client,
            upstream_req,
            connection.stamp.lines(),
        )
        .await;
    let backend = Arc::clone(upstream.backend());
    if let Some(record) = record {
        record.upstream(backend.authority(), asked.elapsed());
    }
    // The backend moves on failover; the link changes when a connection is bound.
    connection
        .registration
        .set_upstream(backend.authority(), upstream.link());
    drop(upstream);
    let backend_name = backend.authority();
    // A backend response's map holds only the fields the gateway reads (the others go by as
    // lines): one pass tells which checks have anything to read.
    let in_response = match &result {
        Ok(response) => PresentFields::of(response.headers()),
        Err(_) => PresentFields::default(),
    };
    let response = match result {
        Ok(response)
            if in_response.transfer_encoding
                && let Some(codings) = rewrite::unsupported_transfer_coding(response.headers()) =>
        {
            // Each hop is framed anew (chunked): any other coding would reach the client unlabelled,
            // its coded bytes taken for the content. The unread body closes that upstream connection.
            let failure = Failure::BackendTransferCoding {
                backend: backend_name,
                codings: &codings,
            };
            fail(connection, failure)
        }
        Ok(response)
            if response.status() == StatusCode::SWITCHING_PROTOCOLS
                && (client_upgrade.is_none() || !in_response.upgrade) =>
        {
            // A 101 the client did not ask for, or one that names no protocol: nothing could
            // speak on that connection afterwards.
            fail(
                connection,
                Failure::UnrequestedSwitch {
                    backend: backend_name,
                },
            )
        }
        Ok(mut response) => {
            let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
            let upstream_upgrade = switched
                .then(|| upgrade::upstream_side(&mut response))
                .flatten();
            let protocol = in_response
                .upgrade
                .then(|| response.headers().get(http::header::UPGRADE).cloned())
                .flatten();
            let (mut parts, body) = response.into_parts();
            rewrite::prepare_response(&mut parts.headers);
            if let (Some(upstream_upgrade), Some(client_upgrade), Some(protocol)) =
                (upstream_upgrade, client_upgrade.take(), protocol)
            {
                upgrade::restore(&mut parts.headers, protocol);
                let tunnel = upgrade::spawn_tunnel(
                    client_upgrade,
                    upstream_upgrade,
                    connection.conn.hash(),
                    &gateway.metrics,
                );
                if let Ok(mut slot) = connection.tunnel.lock() {
                    *slot = Some(tunnel);
                }
            }
            if let Some(Retired(_)) = parts.extensions.get::<Retired>() {
                // The upstream connection reached a cap and closes after this response: the
                // client connection, whose NTLM context lived there, closes with it.
                parts.headers.insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Response::from_parts(parts, Either::Left(body))
        }
        Err(error) => fail(
            connection,
            Failure::Exchange {
                backend: backend_name,
                error: &error,
            },
        ),
    };
    if let Some(leg) = &leg {
        record_auth_outcome(connection, leg, &response);
    }
    (response, Some(backend))
}

/// A Type3 from a user or address past its lockout threshold: 429 at the gateway, so that neither
/// the backend nor the domain controller counts another bad password. `None`: let it through.
pub(super) fn refuse_locked_out(
    connection: &ClientConnection,
    account: &str,
) -> Option<Response<ProxyBody>> {
    let Verdict::Refuse {
        kind,
        failures,
        retry_after,
    } = connection.gateway.lockout.check(account, connection.client)
    else {
        return None;
    };
    // Whole seconds, rounded up: a client retrying on time finds the window moved on.
    let retry_secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    let retry_secs = retry_secs.max(1);
    tracing::warn!(
        conn = %connection.conn,
        user = %account,
        client = %connection.client,
        count = kind.name(),
        failures,
        retry_after_secs = retry_secs,
        "NTLM login refused before the backend (429): too many failed logins in the lockout \
         window; the client must stop or fix its password (a trusted client address can go in \
         lockout.allow)"
    );
    connection
        .registration
        .set_auth(crate::guard::AuthState::Failed(Some(account.into())));
    // Refused at the gateway: the backend gave no verdict to time.
    connection.handshake_ended();
    // The half-done handshake at the backend goes with the connection.
    let mut response = gateway_response(
        StatusCode::TOO_MANY_REQUESTS,
        "Too many failed logins; try again later",
        Closes::Connection,
    );
    response.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from(retry_secs),
    );
    Some(response)
}

/// The connection's auth state after a request with a token, and the lockout guard's count.
pub(super) fn record_auth_outcome(
    connection: &ClientConnection,
    leg: &Leg,
    response: &Response<ProxyBody>,
) {
    let challenged = crate::guard::auth_state::carries_challenge(response.headers());
    let state = leg.outcome(response.status(), challenged);
    if let Some(account) = leg.account() {
        let lockout = &connection.gateway.lockout;
        match &state {
            crate::guard::AuthState::Failed(_) => {
                let failures = lockout.record_failure(account, connection.client);
                tracing::info!(
                    conn = %connection.conn,
                    user = %account,
                    client = %connection.client,
                    failures,
                    "NTLM login failed (the backend answered the Type3 with 401)"
                );
            }
            crate::guard::AuthState::Authenticated(_) => {
                lockout.record_success(account, connection.client);
            }
            _ => {}
        }
    }
    let result = match &state {
        crate::guard::AuthState::Authenticated(_) => Some(HandshakeResult::Authenticated),
        crate::guard::AuthState::Failed(_) => Some(HandshakeResult::Failed),
        _ => None,
    };
    if let Some(result) = result
        && let Some(elapsed) = connection.handshake_ended()
    {
        connection.gateway.metrics.ntlm_handshake(result, elapsed);
    }
    connection.registration.set_auth(state);
}
