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

use std::{
    convert::Infallible,
    fmt,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use subtle::ConstantTimeEq;
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::{Semaphore, mpsc, oneshot, watch},
};

use crate::{
    kernel::{KernelCounters, KernelTracker, monotonic_ns},
    metrics::{self, Metrics, Scrape},
    registry::Registry,
    upstream::BackendState,
};

/// A request head must be complete this long after the connection opened or the previous response.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// No admin connection lives longer than this (a client that stops reading a response included).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Admin connections open at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 16;
/// Shortest accepted bearer token: 32 characters (e.g. `openssl rand -hex 16`, 128 bits).
const MIN_TOKEN_CHARS: usize = 32;

/// The admin endpoint and who may read its private pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub endpoint: AdminEndpoint,
    /// With a TCP endpoint: the file with the bearer token.
    pub token_file: Option<PathBuf>,
    /// The token, read (and checked) at start; a reload does not read it again (the endpoint and
    /// its token change only with a restart).
    pub token: Option<AdminToken>,
}

/// Where the admin endpoint listens: `HOST:PORT` or `unix:/absolute/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminEndpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for AdminEndpoint {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(format!("{text:?}: a unix: socket needs an absolute path"));
            }
            // sun_path holds 108 bytes with the terminating NUL.
            if path.as_os_str().len() > 107 {
                return Err(format!("{text:?}: a socket path is at most 107 bytes"));
            }
            return Ok(AdminEndpoint::Unix(path));
        }
        text.parse().map(AdminEndpoint::Tcp).map_err(|_| {
            format!("{text:?} is neither HOST:PORT nor unix:/absolute/path/admin.sock")
        })
    }
}

impl fmt::Display for AdminEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminEndpoint::Tcp(addr) => write!(f, "{addr}"),
            AdminEndpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The bearer token that opens `/connections` and `/kernel` on a TCP admin address.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

#[derive(Debug, Error)]
pub enum TokenError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} can be read by every local user (mode {mode:o}); `chmod 600` it (or 640 for a group)"
    )]
    WorldReadable { path: PathBuf, mode: u32 },
    #[error(
        "{path}: the token must be at least {MIN_TOKEN_CHARS} visible ASCII characters without          spaces (e.g. `openssl rand -hex 32 > {path}`)"
    )]
    Weak { path: PathBuf },
}

impl AdminToken {
    /// Reads the token (surrounding whitespace, such as a final newline, is not part of it).
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let read = |source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(read)?.permissions().mode();
        if mode & 0o007 != 0 {
            return Err(TokenError::WorldReadable {
                path: path.to_path_buf(),
                mode: mode & 0o7777,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let token = text.trim();
        if token.len() < MIN_TOKEN_CHARS || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Weak {
                path: path.to_path_buf(),
            });
        }
        Ok(AdminToken(token.to_string()))
    }

    /// The token itself, for a client that sends it (`ntlm-tag conns`).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether an `Authorization` header value is `Bearer <this token>` (compared in constant time,
    /// so response timing tells nothing about how much of a guess was right).
    fn admits(&self, authorization: Option<&http::HeaderValue>) -> bool {
        let Some(value) = authorization.map(http::HeaderValue::as_bytes) else {
            return false;
        };
        let Some((scheme, credentials)) = value.split_first_chunk::<7>() else {
            return false;
        };
        scheme.eq_ignore_ascii_case(b"bearer ")
            && bool::from(credentials.trim_ascii().ct_eq(self.0.as_bytes()))
    }
}

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

/// The bound admin endpoint, bound before the async runtime exists (start-up binds while still
/// privileged, then switches user before any runtime thread is made). A unix socket's file is
/// removed when this is dropped.
pub enum AdminListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, SocketFile),
}

/// The admin endpoint registered with the runtime, as [`serve`] accepts on it.
enum Accepting {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Removes the socket file at exit (best effort: a leftover is removed at the next start).
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if !crate::handover::owns_socket_files() {
            // The other process of an upgrade serves on it.
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.0) {
            tracing::info!(path = %self.0.display(), error = %e, "cannot remove the admin socket; the next start removes it");
        }
    }
}

impl AdminListener {
    /// Binds `endpoint`. A unix socket is created 0600 (and its directory 0700 if missing), owned by
    /// `owner` (uid, gid) when the gateway will switch to that user; a stale socket file of an
    /// earlier run is replaced, a live one (another gateway answers on it) is an error.
    pub fn bind(endpoint: &AdminEndpoint, owner: Option<(u32, u32)>) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        match endpoint {
            AdminEndpoint::Tcp(addr) => {
                let listener = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("cannot listen on admin address {addr}"))?;
                listener
                    .set_nonblocking(true)
                    .with_context(|| format!("cannot listen on admin address {addr}"))?;
                Ok(AdminListener::Tcp(listener))
            }
            AdminEndpoint::Unix(path) => {
                if let Some(dir) = path.parent()
                    && !dir.exists()
                {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                    if let Some((uid, gid)) = owner {
                        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).with_context(|| {
                            format!("cannot hand {} to the service user", dir.display())
                        })?;
                    }
                }
                remove_stale_socket(path)?;
                let listener = std::os::unix::net::UnixListener::bind(path).with_context(|| {
                    format!("cannot create the admin socket {}", path.display())
                })?;
                listener.set_nonblocking(true).with_context(|| {
                    format!("cannot create the admin socket {}", path.display())
                })?;
                let file = SocketFile(path.clone());
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("cannot chmod 600 {}", path.display()))?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(path, Some(uid), Some(gid)).with_context(|| {
                        format!("cannot hand {} to the service user", path.display())
                    })?;
                }
                Ok(AdminListener::Unix(listener, file))
            }
        }
    }

    /// The listening socket a predecessor handed over for `endpoint` (an upgrade).
    pub fn inherited(endpoint: &AdminEndpoint, fd: std::os::fd::OwnedFd) -> std::io::Result<Self> {
        match endpoint {
            AdminEndpoint::Tcp(_) => {
                let listener = std::net::TcpListener::from(fd);
                listener.set_nonblocking(true)?;
                Ok(AdminListener::Tcp(listener))
            }
            AdminEndpoint::Unix(path) => {
                let listener = std::os::unix::net::UnixListener::from(fd);
                listener.set_nonblocking(true)?;
                Ok(AdminListener::Unix(listener, SocketFile(path.clone())))
            }
        }
    }

    /// A second descriptor of the listening socket, to hand to a successor.
    pub fn dup(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd as _;
        match self {
            AdminListener::Tcp(l) => l.as_fd().try_clone_to_owned(),
            AdminListener::Unix(l, _) => l.as_fd().try_clone_to_owned(),
        }
    }

    /// What the ready line shows.
    pub fn describe(&self) -> String {
        match self {
            AdminListener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            AdminListener::Unix(_, file) => format!("unix:{}", file.0.display()),
        }
    }
}

fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        anyhow::bail!(
            "{} exists and is not a socket; refusing to replace it (choose another admin path)",
            path.display()
        );
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "{} is the admin socket of a running gateway; stop it or choose another admin path",
            path.display()
        );
    }
    tracing::info!(path = %path.display(), "removing the admin socket an earlier run left");
    std::fs::remove_file(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot remove the stale admin socket {}: {e}",
            path.display()
        )
    })
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
    loop {
        let accepted = tokio::select! {
            accepted = accept(&listener) => accepted,
            _ = shutdown.changed() => return,
        };
        let io = match accepted {
            Ok(io) => io,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                // EMFILE and friends: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
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

/// An accepted admin connection, TCP or unix.
trait AdminIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AdminIo for T {}

async fn accept(listener: &Accepting) -> std::io::Result<Box<dyn AdminIo>> {
    Ok(match listener {
        Accepting::Tcp(l) => Box::new(l.accept().await?.0),
        Accepting::Unix(l) => Box::new(l.accept().await?.0),
    })
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
                backends: (state.backends)(),
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
        xdp: kernel
            .map(|k| k.xdp_attachments().to_vec())
            .unwrap_or_default(),
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
