//! The admin endpoint: `/healthz` (ready: some route has a backend up), `/livez` (the process
//! answers), `/metrics` (no client addresses, no ids), `/connections` (the live table), `/kernel`
//! (the eBPF side's counters and records) and `POST /reload` (re-read the configuration file and
//! answer with the result; `ntlm-tag reload` asks it).
//!
//! `/connections` and `/kernel` name clients, and `/connections` correlates them with connection
//! ids, so they are private, and so is `/reload`, which changes what runs: on a `unix:` socket
//! (created 0600, owned by the service user) the file mode keeps other local users out; on a TCP
//! address they need `Authorization: Bearer <token>` with the token from `admin_token_file`, and
//! without one they are refused with a message saying how to enable them. Ids are shown as keyed
//! hashes unless `show_full_ids` (see `identity::id_hash`). Every admin connection has a head
//! timeout, a lifetime and a cap on how many are open at once, so no local client can pin the
//! gateway's resources through it.
#![forbid(unsafe_code)]

pub mod client;

mod endpoint;

use endpoint::{Accepting, accept};
pub use endpoint::{AdminConfig, AdminEndpoint, AdminListener, AdminToken, SocketFile, TokenError};

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::{
    net::{TcpListener, UnixListener},
    sync::{Semaphore, mpsc, oneshot, watch},
};

use crate::{
    kernel::{KernelCounters, KernelTracker, monotonic_ns},
    metrics::{self, BackendUp, Metrics, Scrape},
    proxy::accept_errors::AcceptErrors,
    registry::Registry,
    upstream::BackendState,
};

/// A request head must be complete this long after the connection opened or the previous response.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// No admin connection lives longer than this (a client that stops reading a response included).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Admin connections open at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 16;

/// Who may read `/connections` and `/kernel`.
#[derive(Debug, Clone)]
pub enum PrivateAccess {
    /// A unix socket: whoever can open it (its file mode decides).
    Socket,
    /// TCP with a token: requests that carry it.
    Bearer(AdminToken),
    /// TCP without a token: nobody.
    Closed,
}

/// What the admin listener reports.
pub struct AdminState {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub lockout: Arc<crate::guard::LockoutGuard>,
    pub kernel: Option<Arc<KernelTracker>>,
    /// `attached`, `off`, or `unavailable: <reason>`.
    pub ebpf_status: String,
    pub private: PrivateAccess,
    /// The running configuration's backends and whether each is up for each route, asked at
    /// every request (a reload changes them).
    pub backends: BackendHealth,
    /// Where `POST /reload` sends its request.
    pub reload: ReloadRequests,
}

/// How a reload ended: what was applied, or why the file was refused (the running configuration
/// stays).
pub type ReloadOutcome = Result<String, String>;

/// Asks the gateway's control loop for a reload; it runs reloads one at a time (signals and
/// requests alike) and answers each request with the outcome of a reload that started after it.
pub type ReloadRequests = mpsc::Sender<oneshot::Sender<ReloadOutcome>>;

/// Reads the backends' health per route.
pub type BackendHealth = Arc<dyn Fn() -> Vec<BackendState> + Send + Sync>;

#[derive(Serialize)]
struct KernelReport {
    ebpf: String,
    cgroup: Option<String>,
    map_entries: Option<u32>,
    counters: Option<KernelCounters>,
    xdp: Vec<crate::kernel::XdpAttachment>,
    records: Vec<RecordRow>,
}

#[derive(Serialize)]
struct RecordRow {
    cookie: u64,
    client: String,
    peer: String,
    local: String,
    learned_from: &'static str,
    balancer: Option<String>,
    age_ms: u64,
}

pub async fn serve(
    listener: AdminListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (accepting, _socket_file) = match listener {
        AdminListener::Tcp(l) => (TcpListener::from_std(l).map(Accepting::Tcp), None),
        AdminListener::Unix(l, file) => {
            (UnixListener::from_std(l).map(Accepting::Unix), Some(file))
        }
    };
    let listener = match accepting {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the admin endpoint with the runtime; it is not served");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut errors = AcceptErrors::new("admin");
    loop {
        let accepted = tokio::select! {
            accepted = accept(&listener) => accepted,
            _ = shutdown.changed() => return,
        };
        let io = match accepted {
            Ok(io) => {
                errors.accepted();
                io
            }
            Err(e) => {
                // EMFILE and friends: pause instead of spinning, warn once per interval.
                let pause = errors.failed(&e, MAX_CONNECTIONS - slots.available_permits());
                tokio::select! {
                    () = tokio::time::sleep(pause) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(
                limit = MAX_CONNECTIONS,
                "too many admin connections open; closing a new one (is something polling the admin endpoint without closing?)"
            );
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(&req, &state).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(io), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(slot);
        });
    }
}

/// Ready to serve while some route has a backend up: a balancer or orchestrator should send
/// clients only then. A route with no backend up does not make the gateway unready: a broken
/// virtual directory is usually broken behind every gateway alike, and taking the gateways out
/// would take every other route down with it. The body names such routes (`degraded`), and
/// `backend_up{route}` alerts on them.
fn readiness(states: &[BackendState]) -> Response<Full<Bytes>> {
    let mut routes: Vec<(&str, usize, usize)> = Vec::new();
    for s in states {
        match routes.iter_mut().find(|(name, ..)| *name == s.route) {
            Some((_, up, of)) => {
                *up += usize::from(s.up);
                *of += 1;
            }
            None => routes.push((&s.route, usize::from(s.up), 1)),
        }
    }
    let lines: String = routes
        .iter()
        .map(|(name, up, of)| format!("route {name}: {up} of {of} backends up\n"))
        .collect();
    let down: Vec<&str> = routes
        .iter()
        .filter(|(_, up, _)| *up == 0)
        .map(|(name, ..)| *name)
        .collect();
    if down.len() == routes.len() {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no backend is up\n{lines}"),
        )
    } else if down.is_empty() {
        text(StatusCode::OK, format!("ok\n{lines}"))
    } else {
        text(
            StatusCode::OK,
            format!(
                "degraded: no backend up for route {}\n{lines}",
                down.join(", route ")
            ),
        )
    }
}

async fn handle(req: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    if req.uri().path() != "/reload" {
        return route(req, state);
    }
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "POST only\n");
    }
    if let Some(refusal) = refuse_private(req, &state.private) {
        return refusal;
    }
    reload(&state.reload).await
}

/// Runs a reload through the control loop and answers with its outcome: 200 applied, 422 refused
/// (with the reason), 503 when the gateway is stopping.
async fn reload(requests: &ReloadRequests) -> Response<Full<Bytes>> {
    let stopping = || {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is stopping; nothing was reloaded\n",
        )
    };
    let (reply, outcome) = oneshot::channel();
    if requests.send(reply).await.is_err() {
        return stopping();
    }
    match outcome.await {
        Ok(Ok(summary)) => text(StatusCode::OK, format!("reloaded: {summary}\n")),
        Ok(Err(reason)) => text(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("reload refused, the running configuration stays: {reason}\n"),
        ),
        Err(_) => stopping(),
    }
}

fn route(req: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    let path = req.uri().path();
    if matches!(path, "/connections" | "/kernel")
        && let Some(refusal) = refuse_private(req, &state.private)
    {
        return refusal;
    }
    match path {
        "/healthz" => readiness(&(state.backends)()),
        // Alive: the process and its runtime answer; restart it only when this fails.
        "/livez" => text(StatusCode::OK, "ok\n"),
        "/connections" => json(&state.registry.rows()),
        "/kernel" => json(&kernel_report(state)),
        "/metrics" => {
            let kernel = state
                .kernel
                .as_deref()
                .map(|k| (k.counters(), k.map_entries()));
            let body = state.metrics.render(Scrape {
                connections_open: state.registry.len(),
                kernel: kernel.as_ref().map(|(c, n)| (c, *n)),
                backends: (state.backends)()
                    .into_iter()
                    .map(|b| BackendUp {
                        route: b.route,
                        backend: b.backend,
                        up: b.up,
                    })
                    .collect(),
                auth_states: state.registry.auth_counts(),
                lockout: state.lockout.totals(),
            });
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz, /livez, /connections, /kernel, /metrics, POST /reload\n",
        ),
    }
}

/// `None` when the request may read a private page; else the refusal, saying how to get access.
fn refuse_private(
    req: &Request<Incoming>,
    access: &PrivateAccess,
) -> Option<Response<Full<Bytes>>> {
    match access {
        PrivateAccess::Socket => None,
        PrivateAccess::Bearer(token) if token.admits(req.headers().get(header::AUTHORIZATION)) => {
            None
        }
        PrivateAccess::Bearer(_) => {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "/connections, /kernel and /reload need `Authorization: Bearer <token>` with the \
                 token in admin_token_file (`ntlm-tag conns` and `ntlm-tag reload` send it with \
                 --token-file FILE)\n",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"ntlm-tag admin\""),
            );
            Some(r)
        }
        PrivateAccess::Closed => Some(text(
            StatusCode::FORBIDDEN,
            "/connections and /kernel show clients and connections, and /reload changes what runs, \
             so a TCP admin address serves them only with admin_token_file set; or use \
             admin = \"unix:/run/ntlm-tag/admin.sock\"\n",
        )),
    }
}

fn kernel_report(state: &AdminState) -> KernelReport {
    let now = monotonic_ns();
    let kernel = state.kernel.as_deref();
    KernelReport {
        ebpf: state.ebpf_status.clone(),
        cgroup: kernel.map(|k| k.cgroup_path().display().to_string()),
        map_entries: kernel.map(KernelTracker::map_entries),
        counters: kernel.map(KernelTracker::counters),
        xdp: kernel.map(|k| k.xdp_attachments()).unwrap_or_default(),
        records: kernel
            .map(|k| {
                k.records()
                    .into_iter()
                    .map(|(cookie, r)| RecordRow {
                        cookie,
                        client: r.client.to_string(),
                        peer: r.peer.to_string(),
                        local: r.local.to_string(),
                        learned_from: r.learned_from.name(),
                        balancer: r.balancer.map(|b| b.to_string()),
                        age_ms: now.saturating_sub(r.established_ns) / 1_000_000,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot render\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(route: &str, backend: &str, up: bool) -> BackendState {
        BackendState {
            route: route.to_string(),
            backend: backend.to_string(),
            up,
        }
    }

    /// `/healthz`'s status and body for `states`.
    fn answer(states: &[BackendState]) -> (StatusCode, String) {
        use http_body_util::BodyExt as _;
        let response = readiness(states);
        let status = response.status();
        let bytes = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(response.into_body().collect())
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[test]
    fn ready_while_some_route_has_a_backend_up_naming_the_routes_without() {
        let all_up = [
            state("/owa", "a:80", true),
            state("/owa", "b:80", false),
            state("default", "a:80", true),
        ];
        let (status, body) = answer(&all_up);
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with("ok\n") && body.contains("route /owa: 1 of 2 backends up"));

        let degraded = [
            state("/owa", "a:80", false),
            state("/owa", "b:80", false),
            state("default", "a:80", true),
        ];
        let (status, body) = answer(&degraded);
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.starts_with("degraded: no backend up for route /owa\n"),
            "{body}"
        );

        let none = [
            state("/owa", "a:80", false),
            state("default", "a:80", false),
        ];
        let (status, body) = answer(&none);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("route default: 0 of 1 backends up"), "{body}");
    }
}
