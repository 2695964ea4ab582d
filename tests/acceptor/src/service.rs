//! The HTTP side: one hyper HTTP/1.1 connection per TCP connection, IIS-like NTLM replies.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::acceptor::{Acceptor, SecurityContext, Step};
use crate::authz::{self, Presented};
use crate::cli::KeyMode;
use crate::log::{self, RequestRecord};
use crate::store::ContextStore;
use crate::workloads::{self, Shape, Zeros};

/// A short answer, or a long streamed one (`out_bytes=N`).
type ReplyBody = Either<Full<Bytes>, Zeros>;

pub const AUTHENTICATED_USER: HeaderName = HeaderName::from_static("x-authenticated-user");

/// Everything shared by all connections.
pub struct App {
    pub acceptor: Acceptor,
    pub key: KeyMode,
    pub header: HeaderName,
    pub contexts: ContextStore,
    /// Path prefixes answered 503 (`--broken`).
    pub broken: Vec<String>,
}

impl App {
    fn is_broken(&self, path: &str) -> bool {
        self.broken.iter().any(|prefix| {
            path.get(..prefix.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
        })
    }
}

/// An anonymous health page: `/healthz`, or an Exchange-style `<vdir>/healthcheck.htm`.
fn is_health_page(path: &str) -> bool {
    path == "/healthz"
        || path
            .rsplit('/')
            .next()
            .is_some_and(|page| page.eq_ignore_ascii_case("healthcheck.htm"))
}

/// One TCP connection.
struct Conn {
    peer: SocketAddr,
    serial: u64,
    /// The security context in `--key connection` mode.
    context: Mutex<SecurityContext>,
}

/// What to answer, before it becomes a response.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Health,
    /// Under a `--broken` prefix.
    Broken,
    Authenticated(String),
    Challenge(authz::Mechanism, Vec<u8>),
    /// 401 with fresh `WWW-Authenticate: Negotiate` and `WWW-Authenticate: NTLM`; the reason a
    /// presented token was refused, if one was.
    Unauthorized(Option<String>),
    BadRequest(String),
    Internal(String),
}

/// Serves one connection (plain TCP, or TLS once the handshake is done).
/// How long a connection may wait for its next request head: IIS's default `connectionTimeout`.
const IDLE_CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

pub async fn serve_connection<IO>(app: Arc<App>, stream: IO, peer: SocketAddr, serial: u64)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(Conn {
        peer,
        serial,
        context: Mutex::new(SecurityContext::Fresh),
    });
    let service = service_fn(move |req| handle(Arc::clone(&app), Arc::clone(&conn), req));
    if let Err(e) = http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        // hyper's header-read clock also runs while a keep-alive connection waits for its next
        // request (30 s by default), so an authenticated connection idle for 30 s would be closed.
        // IIS keeps idle connections for 120 s (`connectionTimeout`); tests under emulation
        // easily leave a logged-in connection idle for more than 30 s.
        .header_read_timeout(IDLE_CONNECTION_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await
    {
        eprintln!("ntlm-acceptor: conn {serial} from {peer}: {e}");
    }
}

async fn handle(
    app: Arc<App>,
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<ReplyBody>, Infallible> {
    let (mut parts, body) = req.into_parts();
    let on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let body_len = drain(body).await;
    let conn_id = connection_id(&parts.headers, &app.header);
    let conn_id_text = conn_id
        .as_ref()
        .ok()
        .and_then(|v| v.as_ref())
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let presented = authz::from_headers(&parts.headers);

    let reply = if app.is_broken(parts.uri.path()) {
        Reply::Broken
    } else if is_health_page(parts.uri.path()) {
        Reply::Health
    } else if let Err(e) = &body_len {
        Reply::BadRequest(format!("cannot read the request body: {e}"))
    } else {
        match app.key {
            KeyMode::Connection => {
                let mut ctx = conn.context.lock().unwrap_or_else(PoisonError::into_inner);
                authenticate(&app.acceptor, &mut ctx, presented.as_ref())
            }
            KeyMode::Header => match &conn_id {
                Ok(Some(id)) => app.contexts.with(id.as_bytes(), |ctx| {
                    authenticate(&app.acceptor, ctx, presented.as_ref())
                }),
                Ok(None) => Reply::BadRequest(format!("missing {} header", app.header)),
                Err(e) => Reply::BadRequest(e.clone()),
            },
        }
    };

    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path(), |p| p.as_str());
    let shape = Shape::from_query(parts.uri.query());
    let response = match (
        &reply,
        workloads::websocket_accept(&parts.headers),
        on_upgrade,
    ) {
        (Reply::Authenticated(_), Some(accept), Some(upgrade)) => {
            tokio::spawn(workloads::echo(upgrade, conn.serial));
            workloads::switching_protocols(accept).map(Either::Left)
        }
        (Reply::Authenticated(_), ..) => {
            if let Some(delay) = shape.delay {
                tokio::time::sleep(delay).await;
            }
            match shape.out_bytes {
                Some(n) => Response::new(Either::Right(Zeros::new(n))),
                None => respond(&reply, conn_id_text.as_deref()).map(Either::Left),
            }
        }
        _ => respond(&reply, conn_id_text.as_deref()).map(Either::Left),
    };
    if let Reply::Unauthorized(Some(why)) | Reply::BadRequest(why) | Reply::Internal(why) = &reply {
        // Why, for whoever debugs a test; stdout stays machine-readable.
        eprintln!(
            "ntlm-acceptor: conn {} id={:?} {} {path}: {}: {why}",
            conn.serial,
            conn_id_text.as_deref().unwrap_or(""),
            parts.method,
            response.status().as_u16(),
        );
    }
    log::request(&RequestRecord {
        peer: conn.peer,
        conn: conn.serial,
        conn_id: conn_id_text.as_deref(),
        method: parts.method.as_str(),
        path,
        authorization: presented.as_ref().map(|p| p.scheme.as_str()),
        ntlm_message: presented.as_ref().and_then(ntlm_message_type),
        status: response.status().as_u16(),
        user: match &reply {
            Reply::Authenticated(user) => Some(user),
            _ => None,
        },
        body_len: body_len.unwrap_or(0),
        refused: match &reply {
            Reply::Unauthorized(Some(why)) | Reply::BadRequest(why) | Reply::Internal(why) => {
                Some(why)
            }
            _ => None,
        },
    });
    Ok(response)
}

/// Reads the body to its end, counting bytes (this is also what makes hyper answer
/// `Expect: 100-continue`).
async fn drain(mut body: Incoming) -> Result<u64, hyper::Error> {
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            len = len.saturating_add(data.len() as u64);
        }
    }
    Ok(len)
}

/// The connection-id header: `Ok(None)` when absent, an error text when repeated or empty.
fn connection_id(headers: &HeaderMap, name: &HeaderName) -> Result<Option<HeaderValue>, String> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(format!("more than one {name} header"));
    }
    if first.is_empty() {
        return Err(format!("empty {name} header"));
    }
    Ok(Some(first.clone()))
}

/// The message type of a raw NTLM token (`NTLMSSP\0` then a little-endian u32).
fn ntlm_message_type(presented: &Presented) -> Option<u32> {
    let (_, token) = presented.token.as_ref().ok()?;
    let rest = token.strip_prefix(b"NTLMSSP\0")?;
    Some(u32::from_le_bytes(rest.get(..4)?.try_into().ok()?))
}

/// One step of the IIS-like protocol on `ctx`.
fn authenticate(
    acceptor: &Acceptor,
    ctx: &mut SecurityContext,
    presented: Option<&Presented>,
) -> Reply {
    let Some(presented) = presented else {
        return match ctx.user() {
            Some(user) => Reply::Authenticated(user.to_string()),
            None => Reply::Unauthorized(None),
        };
    };
    let (mechanism, token) = match &presented.token {
        Ok(t) => t,
        Err(e) => {
            *ctx = SecurityContext::Fresh;
            return Reply::Unauthorized(Some(e.to_string()));
        }
    };
    match acceptor.step(ctx, token) {
        Ok(Step::Challenge(type2)) => Reply::Challenge(*mechanism, type2),
        Ok(Step::Accepted(user)) => Reply::Authenticated(user),
        Ok(Step::Rejected(why)) => Reply::Unauthorized(Some(why.to_string())),
        Err(e) => Reply::Internal(e.to_string()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn respond(reply: &Reply, conn_id: Option<&str>) -> Response<Full<Bytes>> {
    match reply {
        Reply::Health => text(StatusCode::OK, "ok\n".to_string()),
        Reply::Broken => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "503 virtual directory broken (--broken)\n".to_string(),
        ),
        Reply::Authenticated(user) => {
            let body = format!("user={user}\nconn_id={}\n", conn_id.unwrap_or(""));
            let mut response = text(StatusCode::OK, body);
            if let Ok(v) = HeaderValue::from_str(user) {
                response.headers_mut().insert(AUTHENTICATED_USER, v);
            }
            response
        }
        Reply::Challenge(mechanism, type2) => {
            let mut response = text(StatusCode::UNAUTHORIZED, "401 Unauthorized\n".to_string());
            match HeaderValue::try_from(authz::challenge_header(*mechanism, type2)) {
                Ok(v) => {
                    response.headers_mut().insert(WWW_AUTHENTICATE, v);
                    response
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        Reply::Unauthorized(_) => {
            let mut response = text(StatusCode::UNAUTHORIZED, "401 Unauthorized\n".to_string());
            let headers = response.headers_mut();
            headers.append(WWW_AUTHENTICATE, HeaderValue::from_static("Negotiate"));
            headers.append(WWW_AUTHENTICATE, HeaderValue::from_static("NTLM"));
            response
        }
        Reply::BadRequest(why) => text(StatusCode::BAD_REQUEST, format!("{why}\n")),
        Reply::Internal(why) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{why}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acceptor::tests::{acceptor, type3};

    const TYPE1_B64: &[u8] = b"NTLM TlRMTVNTUAABAAAABoIIAAAAAAAAAAAAAAAAAAAAAAA=";

    fn presented(value: &[u8]) -> Option<Presented> {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_bytes(value).expect("header value"),
        );
        authz::from_headers(&h)
    }

    #[test]
    fn iis_like_sequence() {
        let a = acceptor();
        let mut ctx = SecurityContext::Fresh;
        assert_eq!(authenticate(&a, &mut ctx, None), Reply::Unauthorized(None));
        let Reply::Challenge(authz::Mechanism::Ntlm, type2) =
            authenticate(&a, &mut ctx, presented(TYPE1_B64).as_ref())
        else {
            panic!("expected a challenge");
        };
        let mut ch = [0; 8];
        ch.copy_from_slice(&type2[24..32]);
        let t3 = format!(
            "NTLM {}",
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                type3("alice", "", "Secret1", &ch)
            )
        );
        assert_eq!(
            authenticate(&a, &mut ctx, presented(t3.as_bytes()).as_ref()),
            Reply::Authenticated("alice".to_string())
        );
        // Authenticated context: later requests need no Authorization.
        assert_eq!(
            authenticate(&a, &mut ctx, None),
            Reply::Authenticated("alice".to_string())
        );
        // Garbage resets it.
        assert!(matches!(
            authenticate(&a, &mut ctx, presented(b"NTLM AAAA").as_ref()),
            Reply::Unauthorized(Some(_))
        ));
        assert_eq!(authenticate(&a, &mut ctx, None), Reply::Unauthorized(None));
    }

    #[test]
    fn negotiate_is_echoed() {
        let a = acceptor();
        let mut ctx = SecurityContext::Fresh;
        let p = presented(b"Negotiate TlRMTVNTUAABAAAABoIIAAAAAAAAAAAAAAAAAAAAAAA=");
        assert!(matches!(
            authenticate(&a, &mut ctx, p.as_ref()),
            Reply::Challenge(authz::Mechanism::Negotiate, _)
        ));
        let r = respond(
            &Reply::Challenge(authz::Mechanism::Negotiate, vec![1, 2]),
            None,
        );
        assert_eq!(r.headers()[WWW_AUTHENTICATE], "Negotiate AQI=");
    }

    #[test]
    fn fresh_401_has_two_challenges_in_order() {
        let r = respond(&Reply::Unauthorized(None), None);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let v: Vec<_> = r.headers().get_all(WWW_AUTHENTICATE).iter().collect();
        assert_eq!(v, ["Negotiate", "NTLM"]);
        let r = respond(&Reply::Authenticated("bob".to_string()), Some("c1"));
        assert_eq!(r.headers()[&AUTHENTICATED_USER], "bob");
    }

    #[test]
    fn connection_id_cases() {
        let name = HeaderName::from_static("jespa-connection-id");
        let mut h = HeaderMap::new();
        assert_eq!(connection_id(&h, &name), Ok(None));
        h.append(&name, HeaderValue::from_static(""));
        assert!(connection_id(&h, &name).is_err());
        h.insert(&name, HeaderValue::from_static("c1"));
        assert_eq!(
            connection_id(&h, &name),
            Ok(Some(HeaderValue::from_static("c1")))
        );
        h.append(&name, HeaderValue::from_static("c2"));
        assert!(connection_id(&h, &name).is_err());
    }
}
