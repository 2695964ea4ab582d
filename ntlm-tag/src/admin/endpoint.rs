//! Where the admin endpoint listens and who may read its private pages: a unix socket (private to
//! root and the service user) or a TCP address with a bearer token.
#![forbid(unsafe_code)]

use std::{
    fmt,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    str::FromStr,
};

use subtle::ConstantTimeEq;
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
};

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
    pub(super) fn admits(&self, authorization: Option<&http::HeaderValue>) -> bool {
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

/// The bound admin endpoint, bound before the async runtime exists (start-up binds while still
/// privileged, then switches user before any runtime thread is made). A unix socket's file is
/// removed when this is dropped.
pub enum AdminListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, SocketFile),
}

/// The admin endpoint registered with the runtime, as [`serve`] accepts on it.
pub(super) enum Accepting {
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

pub(super) fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
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

/// An accepted admin connection, TCP or unix.
pub(super) trait AdminIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AdminIo for T {}

pub(super) async fn accept(listener: &Accepting) -> std::io::Result<Box<dyn AdminIo>> {
    Ok(match listener {
        Accepting::Tcp(l) => Box::new(l.accept().await?.0),
        Accepting::Unix(l) => Box::new(l.accept().await?.0),
    })
}
