//! Responses the gateway makes itself instead of forwarding one: each failure counted by its
//! [`ErrorSource`], logged and answered in one place.

use bytes::Bytes;
use http::{Response, StatusCode, uri::Authority};
use http_body_util::{Either, Full};

use super::{ClientConnection, ProxyBody};
use crate::{
    error::{ErrorSource, error_chain},
    identity::IdHash,
    upstream::UpstreamError,
};

/// A response the gateway makes itself instead of forwarding one, and why.
pub(super) enum Failure<'a> {
    /// The request head is over `limits.max_header_bytes` (hyper bounds only its read buffer).
    HeadTooLarge { head_size: usize, limit: usize },
    /// The request has a transfer coding other than chunked.
    TransferCoding(&'a str),
    /// The backend's response has a transfer coding other than chunked.
    BackendTransferCoding {
        backend: &'a Authority,
        codings: &'a str,
    },
    /// A `101` the client did not ask for, or one that names no protocol.
    UnrequestedSwitch { backend: &'a Authority },
    /// The exchange with the backend failed (or the client broke its request off during it).
    Exchange {
        backend: &'a Authority,
        error: &'a UpstreamError,
    },
}

impl Failure<'_> {
    fn source(&self) -> ErrorSource {
        match self {
            Failure::HeadTooLarge { .. } | Failure::TransferCoding(_) => ErrorSource::Client,
            Failure::BackendTransferCoding { .. } | Failure::UnrequestedSwitch { .. } => {
                ErrorSource::Upstream
            }
            Failure::Exchange { error, .. } => error.error_source(),
        }
    }

    /// The status, the text the client reads, and whether the connection closes after it.
    fn response(&self) -> (StatusCode, &'static str, Closes) {
        match self {
            Failure::HeadTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Request Header Fields Too Large",
                Closes::Connection,
            ),
            Failure::TransferCoding(_) => (
                StatusCode::NOT_IMPLEMENTED,
                "Transfer codings other than chunked are not implemented",
                Closes::Connection,
            ),
            Failure::BackendTransferCoding { .. } => {
                (StatusCode::BAD_GATEWAY, "Bad Gateway", Closes::KeepAlive)
            }
            Failure::UnrequestedSwitch { .. } => {
                (StatusCode::BAD_GATEWAY, "Bad Gateway", Closes::Connection)
            }
            Failure::Exchange { error, .. } => {
                let status = error.status();
                let closes = if error.closes_client() {
                    Closes::Connection
                } else {
                    Closes::KeepAlive
                };
                (status, status.canonical_reason().unwrap_or("error"), closes)
            }
        }
    }

    /// The log line: at info for what only the client can fix, as a warning otherwise.
    fn log(&self, conn: IdHash, status: StatusCode) {
        match *self {
            Failure::HeadTooLarge { head_size, limit } => {
                tracing::info!(conn = %conn, head_size, limit, "request head too large; 431");
            }
            Failure::TransferCoding(codings) => {
                tracing::info!(conn = %conn, transfer_encoding = %codings, "transfer coding other than chunked; 501");
            }
            Failure::BackendTransferCoding { backend, codings } => tracing::warn!(
                conn = %conn,
                backend = %backend,
                transfer_encoding = %codings,
                "backend response with a transfer coding other than chunked; 502 (turn off \
                 transfer-coding compression on the backend; Content-Encoding passes)"
            ),
            Failure::UnrequestedSwitch { backend } => tracing::warn!(
                conn = %conn,
                backend = %backend,
                "backend switched protocols without a matching upgrade request; 502"
            ),
            Failure::Exchange { backend, error } => match error.error_source() {
                ErrorSource::Client => tracing::info!(
                    conn = %conn,
                    backend = %backend,
                    status = status.as_u16(),
                    error = %error_chain(error),
                    "bad request from the client"
                ),
                ErrorSource::Upstream | ErrorSource::Internal => tracing::warn!(
                    conn = %conn,
                    backend = %backend,
                    status = status.as_u16(),
                    error = %error_chain(error),
                    "backend request failed"
                ),
            },
        }
    }

    fn timed_out(&self) -> bool {
        matches!(self, Failure::Exchange { error, .. } if error.is_timeout())
    }
}

/// Counts, logs and answers a failure: the one place a gateway-made error response is built.
pub(super) fn fail(connection: &ClientConnection, failure: Failure<'_>) -> Response<ProxyBody> {
    let source = failure.source();
    source.count(&connection.gateway.metrics, failure.timed_out());
    let (status, text, closes) = failure.response();
    failure.log(connection.conn.hash(), status);
    gateway_response(status, text, closes)
}

/// Whether the client connection closes after a gateway-made response.
#[derive(Clone, Copy)]
pub(super) enum Closes {
    KeepAlive,
    Connection,
}

/// A response the gateway makes itself: a short text body, and `Connection: close` when the
/// connection cannot go on.
pub(super) fn gateway_response(
    status: StatusCode,
    text: &'static str,
    closes: Closes,
) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(format!("{text}\n")))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Closes::Connection = closes {
        headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    response
}
