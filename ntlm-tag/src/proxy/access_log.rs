//! The access log (tracing target `access`): one line per response, the gateway's own (431, 501,
//! 502, 504, 400, 503 over the connection limit) as well as the backends'. The fields are those of
//! nginx's `combined` format (client address, method, path, protocol, status, bytes sent, referer,
//! user agent, host) plus the time to the backend's response head (`upstream_ms`), the whole
//! duration (`duration_ms`), the backend and the connection's id hash. Like nginx, the line is
//! written when the response body has been sent (or abandoned), so that it has the bytes and the
//! whole duration.
#![forbid(unsafe_code)]

use std::{
    net::IpAddr,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Version, header, uri::Authority};
use http_body_util::Either;
use hyper::body::{Body, Frame, SizeHint};

use super::ProxyBody;
use crate::{http1::passed::PassedFields, identity::IdHash};

/// Shown for a field the request did not have, or a response made without a backend.
const NONE: &str = "-";

/// What one access line says about its request, gathered before the response is sent.
pub struct AccessRecord {
    conn: Option<IdHash>,
    conn_id: Option<Box<str>>,
    client: IpAddr,
    method: Option<Method>,
    /// The path only: query strings often carry tokens (OAuth codes, signed URLs).
    path: Option<Box<str>>,
    version: Option<Version>,
    host: Option<HeaderValue>,
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    started: Instant,
    status: u16,
    backend: Option<Authority>,
    upstream: Option<Duration>,
    /// The connection's auth state after this response, and the user when known.
    auth: Option<&'static str>,
    user: Option<Box<str>>,
}

impl AccessRecord {
    /// A request as it arrived (before any header is rewritten).
    pub fn request(
        conn: IdHash,
        conn_id: Option<&str>,
        client: IpAddr,
        parts: (&Method, &http::Uri, Version, &HeaderMap),
        started: Instant,
    ) -> Self {
        let (method, uri, version, headers) = parts;
        let header = |name: header::HeaderName| headers.get(name).cloned();
        AccessRecord {
            conn: Some(conn),
            conn_id: conn_id.map(Into::into),
            client,
            method: Some(method.clone()),
            path: Some(uri.path().into()),
            version: Some(version),
            // HTTP/2 carries the host in the :authority pseudo-header, which is the URI's.
            host: header(header::HOST)
                .or_else(|| uri.authority().and_then(|a| a.as_str().parse().ok())),
            referer: header(header::REFERER),
            user_agent: header(header::USER_AGENT),
            started,
            status: 0,
            backend: None,
            upstream: None,
            auth: None,
            user: None,
        }
    }

    /// A response the gateway made without reading a request (503 over the connection limit, or
    /// hyper's own answer to a request head it could not parse).
    pub fn without_request(conn: Option<IdHash>, client: IpAddr, status: u16) -> Self {
        AccessRecord {
            conn,
            conn_id: None,
            client,
            method: None,
            path: None,
            version: None,
            host: None,
            referer: None,
            user_agent: None,
            started: Instant::now(),
            status,
            backend: None,
            upstream: None,
            auth: None,
            user: None,
        }
    }

    /// The backend that was asked and how long its response head took.
    pub fn upstream(&mut self, backend: &Authority, elapsed: Duration) {
        self.backend = Some(backend.clone());
        self.upstream = Some(elapsed);
    }

    /// The connection's auth state (and user) once this response was decided.
    pub fn auth(&mut self, state: &'static str, user: Option<&str>) {
        self.auth = Some(state);
        self.user = user.map(Into::into);
    }

    pub fn status(&mut self, status: u16) {
        self.status = status;
    }

    /// Writes the line.
    pub fn emit(self, bytes: u64) {
        tracing::info!(
            target: "access",
            conn = self.conn.map(tracing::field::display),
            conn_id = self.conn_id.as_deref().map(tracing::field::display),
            client = %self.client,
            // Tokens and a URI path (no spaces or quotes): shown as they are.
            method = %self.method.as_ref().map_or(NONE, Method::as_str),
            path = %self.path.as_deref().unwrap_or(NONE),
            protocol = %self.version.map_or(NONE, protocol),
            status = self.status,
            bytes,
            // Quoted and escaped (Debug): these are the client's words.
            referer = ?text(&self.referer),
            user_agent = ?text(&self.user_agent),
            host = ?text(&self.host),
            backend = %self.backend.as_ref().map_or(NONE, Authority::as_str),
            upstream_ms = self.upstream.map(Millis).map(tracing::field::display),
            duration_ms = %Millis(self.started.elapsed()),
            auth = self.auth.map(tracing::field::display),
            // Quoted and escaped: the name comes from the client's NTLM message.
            user = self.user.as_deref().map(tracing::field::debug),
        );
    }
}

/// A duration in milliseconds to the microsecond (`66.546`), rounded to the nearest microsecond:
/// written as two integers, without float formatting (which cost more than the rest of the line's
/// numbers) or float noise (0.014457000000000001).
struct Millis(Duration);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let micros = self.0.as_nanos().saturating_add(500) / 1000;
        // Below 1000: fits.
        let frac = (micros % 1000) as u32;
        f.write_str(itoa::Buffer::new().format(micros / 1000))?;
        let digit = |d: u32| b'0' + (d % 10) as u8;
        let frac = [b'.', digit(frac / 100), digit(frac / 10), digit(frac)];
        f.write_str(std::str::from_utf8(&frac).map_err(|_| std::fmt::Error)?)
    }
}

/// A request field's text as the line shows it, borrowed (the line is written once per response).
fn text(value: &Option<HeaderValue>) -> &str {
    value
        .as_ref()
        .map_or(NONE, |v| v.to_str().unwrap_or("(not ASCII)"))
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => NONE,
    }
}

/// A response body that counts the bytes it passes on and writes the access line when it is done
/// (sent to its end, or dropped because the client went away).
pub struct LoggedBody {
    inner: ProxyBody,
    sent: u64,
    record: Option<Box<AccessRecord>>,
}

impl LoggedBody {
    /// `record` is `None` when the access log is off.
    pub fn new(inner: ProxyBody, record: Option<AccessRecord>) -> Self {
        LoggedBody {
            inner,
            sent: 0,
            record: record.map(Box::new),
        }
    }

    /// The backend's response fields that go to the client as they came (none when the gateway
    /// answered itself).
    pub fn passed_fields(&self) -> Option<&PassedFields> {
        match &self.inner {
            Either::Left(upstream) => Some(upstream.passed_fields()),
            Either::Right(_) => None,
        }
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            record.emit(self.sent);
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = <ProxyBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.sent += data.len() as u64;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_are_written_to_the_rounded_microsecond() {
        for (nanos, text) in [
            (0, "0.000"),
            (499, "0.000"),
            (500, "0.001"),
            (14_457_000, "14.457"),
            (66_545_678, "66.546"),
            (1_000_000, "1.000"),
            (3_600_000_000_000, "3600000.000"),
        ] {
            assert_eq!(Millis(Duration::from_nanos(nanos)).to_string(), text);
        }
    }
}
