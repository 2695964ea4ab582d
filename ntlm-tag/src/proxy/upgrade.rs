//! `Connection: Upgrade` pass-through (WebSocket: Windows Admin Center, SignalR, Exchange's
//! PowerShell over WebSocket).
//!
//! `Upgrade` and `Connection` are hop-by-hop headers, removed from everything else the gateway
//! forwards; on an HTTP/1.1 upgrade request they are passed on (the connection-id header is
//! stamped as on every request). The upstream side sends the request on an upstream connection of
//! the client connection's own (its bound or pinned one when it has one, so a WebSocket opened
//! after an NTLM login reaches the same authenticated backend connection), and after a `101
//! Switching Protocols` both connections become one byte tunnel until either side closes. That
//! upstream connection is never pooled: it ends with the tunnel.
#![forbid(unsafe_code)]

use http::{HeaderMap, HeaderValue, Request, Response, header};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::oneshot,
    task::JoinHandle,
};

use super::h1::{PendingUpgrade, reader::Upgraded};
use crate::{
    identity::IdHash,
    metrics::Metrics,
    upstream::{PendingUpstreamUpgrade, UpstreamUpgrade},
};

/// The client's side of an upgrade: its connection once the `101` has been sent to it.
pub enum ClientUpgrade {
    /// From the gateway's HTTP/1.x server.
    H1(oneshot::Receiver<Upgraded>),
    /// From hyper's server.
    Hyper(hyper::upgrade::OnUpgrade),
}

/// Takes the client's side of an upgrade out of its request.
pub fn client_side<B>(req: &mut Request<B>) -> ClientUpgrade {
    let pending = req
        .extensions_mut()
        .remove::<PendingUpgrade>()
        .and_then(|p| p.0.lock().ok()?.take());
    match pending {
        Some(receiver) => ClientUpgrade::H1(receiver),
        None => ClientUpgrade::Hyper(hyper::upgrade::on(req)),
    }
}

/// Takes the backend's side of an upgrade out of its `101` response: the upstream connection.
pub fn upstream_side<B>(response: &mut Response<B>) -> Option<UpstreamUpgrade> {
    response
        .extensions_mut()
        .remove::<PendingUpstreamUpgrade>()
        .and_then(|p| p.0.lock().ok()?.take())
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<S: AsyncRead + AsyncWrite + Send + Unpin> Stream for S {}

impl ClientUpgrade {
    async fn connection(self) -> Result<Box<dyn Stream>, String> {
        match self {
            ClientUpgrade::H1(receiver) => match receiver.await {
                Ok(upgraded) => Ok(Box::new(upgraded)),
                Err(_) => Err("the client connection closed before the switch".into()),
            },
            ClientUpgrade::Hyper(on) => match on.await {
                Ok(upgraded) => Ok(Box::new(TokioIo::new(upgraded))),
                Err(e) => Err(e.to_string()),
            },
        }
    }
}

/// The protocol a request asks to switch to, when the gateway passes the upgrade on. `h2c` is
/// not: the gateway speaks HTTP/1.1 upstream, and HTTP/2 from clients is negotiated with TLS
/// (ALPN) instead.
pub fn requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants_upgrade = crate::upstream::is_upgrade_request(headers);
    let protocol = headers.get(header::UPGRADE)?;
    let h2c = protocol
        .to_str()
        .map_or(true, |p| p.trim().eq_ignore_ascii_case("h2c"));
    (wants_upgrade && !h2c).then(|| protocol.clone())
}

/// Puts the upgrade headers back after the hop-by-hop headers were removed.
pub fn restore(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// Joins the client's and the backend's upgraded connections and copies bytes both ways until
/// either side closes; the task ends with the tunnel.
pub fn spawn_tunnel(
    client: ClientUpgrade,
    mut upstream: UpstreamUpgrade,
    conn: IdHash,
    metrics: &Metrics,
) -> JoinHandle<()> {
    metrics.upgraded();
    tokio::spawn(async move {
        let mut client = match client.connection().await {
            Ok(client) => client,
            Err(e) => {
                tracing::info!(%conn, error = %e, "protocol upgrade did not complete; closing");
                return;
            }
        };
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((sent, received)) => {
                tracing::debug!(%conn, sent, received, "upgraded connection closed")
            }
            Err(e) => tracing::debug!(%conn, error = %e, "upgraded connection ended with an error"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn websocket_upgrades_pass_and_h2c_does_not() {
        let ws = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(requested(&ws), Some(HeaderValue::from_static("websocket")));
        assert_eq!(
            requested(&headers(&[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", "h2c")
            ])),
            None
        );
        // Both headers are needed.
        assert_eq!(requested(&headers(&[("upgrade", "websocket")])), None);
        assert_eq!(requested(&headers(&[("connection", "upgrade")])), None);
    }
}
