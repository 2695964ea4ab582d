//! Zero-downtime upgrade. A new process connects to the running one's upgrade socket and receives
//! its listening sockets (SCM_RIGHTS): the sockets never close, so no connection attempt meets a
//! closed port or loses its place in an accept queue (closing one of several SO_REUSEPORT
//! listeners resets the connections queued on it on kernels without `tcp_migrate_req`, before
//! 5.14). Connections accepted from a socket belong to the cgroup the socket was created in, so the
//! new process joins that cgroup and attaches its own sock_ops program beside the old one's; each
//! records into its own map. The order makes every accepted connection have a record in the map of
//! the process that accepts it:
//!
//! 1. old → new `Offer` with the sockets; the new process joins the cgroup, attaches its programs
//!    (from now on every connection is recorded by both), and makes everything ready to serve;
//! 2. new → old `Ready`; the old process stops accepting, then accepts what is already queued (those
//!    may have been recorded before the new program was attached);
//! 3. old → new `Released`; the new process accepts from now on, the old one serves its own
//!    connections until they close or `timeouts.upgrade_drain_secs` passes.
//!
//! Until `Released`, the old process is unchanged: a successor that fails or disconnects earlier
//! changes nothing.
#![forbid(unsafe_code)]

pub mod wire;

use std::{
    io,
    net::SocketAddr,
    os::{
        fd::{AsFd, OwnedFd},
        unix::{
            fs::{FileTypeExt as _, PermissionsExt as _},
            net::{UnixDatagram, UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;

pub use wire::{Message, Offer, WireError};

/// How long each side waits for the other's next message: the successor's start-up (loading the
/// kernel programs) happens in between, which takes seconds on a slow machine.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether the socket files (admin, upgrade) are this process's to remove at exit: not while a
/// successor is taking over from a running gateway (they are the running one's until it releases
/// them), and not after this process handed them to a successor.
static OWNS_SOCKET_FILES: AtomicBool = AtomicBool::new(true);

pub fn owns_socket_files() -> bool {
    OWNS_SOCKET_FILES.load(Ordering::SeqCst)
}

/// Set once this process released its sockets to a successor: from then on it is not the
/// service's main process, and must not tell the service manager that the service stops.
static HANDED_OVER: AtomicBool = AtomicBool::new(false);

pub fn handed_over() -> bool {
    HANDED_OVER.load(Ordering::SeqCst)
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error(
        "cannot reach a running gateway on the upgrade socket {path}: {source} (is it running, with \
         this upgrade_socket? Start it normally with `ntlm-tag run` if none is)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{0} is the upgrade socket of a running gateway; take over from it with `ntlm-tag upgrade`, \
         or stop it first"
    )]
    Running(PathBuf),
    #[error(
        "{path} exists and is not a socket; refusing to replace it (choose another upgrade_socket)"
    )]
    NotASocket { path: PathBuf },
    #[error("cannot create the upgrade socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the running gateway sent {got}, expected {expected}")]
    Unexpected { expected: &'static str, got: String },
    #[error("the running gateway sent {sockets} sockets for an offer that names {named}")]
    SocketCount { sockets: usize, named: usize },
    #[error("hand-over: {0}")]
    Wire(#[from] WireError),
}

/// The unix socket a successor connects to. Created 0600 by root before the user switch: only
/// root can connect, and the gateway also checks that the peer is root or its own user.
pub struct UpgradeSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl UpgradeSocket {
    /// Binds `path`, replacing a socket file an earlier run left; a live one is an error.
    pub fn bind(path: &Path) -> Result<Self, HandoverError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(HandoverError::NotASocket {
                    path: path.to_path_buf(),
                });
            }
            if UnixStream::connect(path).is_ok() {
                return Err(HandoverError::Running(path.to_path_buf()));
            }
            tracing::info!(path = %path.display(), "removing the upgrade socket an earlier run left");
            let _ = std::fs::remove_file(path);
        }
        let bind_error = |source| HandoverError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_error)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        Ok(UpgradeSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// The socket a predecessor handed over.
    pub fn inherited(fd: OwnedFd, path: &Path) -> io::Result<Self> {
        let listener = UnixListener::from(fd);
        listener.set_nonblocking(true)?;
        Ok(UpgradeSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn dup(&self) -> io::Result<OwnedFd> {
        self.listener.as_fd().try_clone_to_owned()
    }
}

impl Drop for UpgradeSocket {
    fn drop(&mut self) {
        if !owns_socket_files() {
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::debug!(path = %self.path.display(), error = %e, "cannot remove the upgrade socket; the next start removes it");
        }
    }
}

/// What a gateway hands to its successor: duplicates of its sockets, and where they live.
pub struct Handover {
    pub pid: u32,
    pub cgroup: Option<PathBuf>,
    pub listeners: Vec<(SocketAddr, OwnedFd)>,
    pub admin: Option<(String, OwnedFd)>,
    pub upgrade: OwnedFd,
    pub upgrade_path: PathBuf,
}

impl Handover {
    fn offer(&self) -> (Offer, Vec<std::os::fd::BorrowedFd<'_>>) {
        let log_stream = !std::io::IsTerminal::is_terminal(&std::io::stderr());
        let mut fds: Vec<_> = self.listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
        fds.extend(self.admin.iter().map(|(_, fd)| fd.as_fd()));
        fds.push(self.upgrade.as_fd());
        if log_stream {
            fds.push(stderr_fd());
        }
        let offer = Offer {
            pid: self.pid,
            cgroup: self.cgroup.clone(),
            notify_socket: std::env::var("NOTIFY_SOCKET").ok(),
            listeners: self.listeners.iter().map(|(a, _)| *a).collect(),
            admin: self.admin.as_ref().map(|(e, _)| e.clone()),
            upgrade_socket: self.upgrade_path.clone(),
            log_stream,
        };
        (offer, fds)
    }
}

fn stderr_fd() -> std::os::fd::BorrowedFd<'static> {
    // `Stderr` is a handle to fd 2, which lives as long as the process.
    static STDERR: std::sync::OnceLock<std::io::Stderr> = std::sync::OnceLock::new();
    STDERR.get_or_init(std::io::stderr).as_fd()
}

/// A successor that is ready to serve, waiting for `Released`.
pub struct Successor {
    stream: UnixStream,
    pub pid: u32,
    pub uid_nonce: String,
}

impl Successor {
    /// Tells the successor to accept from now on. From here the sockets are its own. The returned
    /// reporter tells it how the drain goes, for its metrics.
    pub fn release(self, drained: usize, draining: usize) -> Result<DrainReports, WireError> {
        HANDED_OVER.store(true, Ordering::SeqCst);
        wire::send(&self.stream, &Message::Released { drained, draining }, &[])?;
        // A successor that stops reading must not hold up the drain.
        let _ = self.stream.set_write_timeout(Some(Duration::from_secs(1)));
        Ok(DrainReports {
            stream: self.stream,
            last: draining,
        })
    }
}

/// The old process's reports to its successor while it drains (best effort: the successor's
/// metrics are all that depends on them).
pub struct DrainReports {
    stream: UnixStream,
    last: usize,
}

impl DrainReports {
    /// Reports the connections still served, when the number changed.
    pub fn draining(&mut self, connections: usize) {
        if connections != self.last {
            self.last = connections;
            self.send(&Message::Draining { connections });
        }
    }

    /// The last report, as this process exits.
    pub fn drained(mut self, closed_at_deadline: usize) {
        self.send(&Message::Drained { closed_at_deadline });
    }

    fn send(&mut self, message: &Message) {
        if let Err(e) = wire::send(&self.stream, message, &[]) {
            tracing::debug!(error = %e, "cannot report the drain to the successor");
        }
    }
}

/// Accepts successors on `socket` until one is ready (it is sent on `ready`; the main loop then
/// releases the sockets to it) or `stop` fires. A successor that is not root or this gateway's own
/// user, or that fails before it is ready, changes nothing.
pub async fn offer_to_successors(
    socket: UpgradeSocket,
    handover: Arc<Handover>,
    ready: mpsc::Sender<Successor>,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match socket
        .listener
        .try_clone()
        .and_then(tokio::net::UnixListener::from_std)
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the upgrade socket with the runtime; upgrades are off");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => return,
        };
        let stream = match accepted.and_then(|(s, _)| s.into_std()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "upgrade socket: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handover = Arc::clone(&handover);
        let offered = tokio::task::spawn_blocking(move || offer(stream, &handover)).await;
        match offered {
            Ok(Ok(successor)) => {
                // From here the main loop hands the sockets over; stopping this task must not
                // remove their files.
                OWNS_SOCKET_FILES.store(false, Ordering::SeqCst);
                tracing::info!(
                    successor = successor.pid,
                    successor_uid_nonce = %successor.uid_nonce,
                    "upgrade: the successor is ready; handing the listeners over"
                );
                if ready.send(successor).await.is_err() {
                    return;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "upgrade did not happen; this process keeps serving as before")
            }
            Err(e) => tracing::error!(error = %e, "upgrade: the hand-over task failed"),
        }
    }
}

/// One successor: checks who it is, sends the offer, waits until it is ready.
fn offer(stream: UnixStream, handover: &Handover) -> Result<Successor, HandoverError> {
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(STEP_TIMEOUT)))
        .map_err(WireError::from)?;
    let peer = rustix::net::sockopt::socket_peercred(&stream).map_err(io::Error::from);
    let peer = peer.map_err(WireError::from)?;
    let own = rustix::process::geteuid();
    if !peer.uid.is_root() && peer.uid != own {
        return Err(HandoverError::Unexpected {
            expected: "a successor running as root or this gateway's user",
            got: format!(
                "a connection from uid {} (pid {})",
                peer.uid.as_raw(),
                peer.pid.as_raw_nonzero()
            ),
        });
    }
    tracing::info!(
        successor = peer.pid.as_raw_nonzero().get(),
        "upgrade: a successor connected; offering the listeners"
    );
    let (offer, fds) = handover.offer();
    wire::send(&stream, &Message::Offer(offer), &fds)?;
    match wire::recv(&stream)? {
        (Message::Ready { pid, uid_nonce }, _) => Ok(Successor {
            stream,
            pid,
            uid_nonce,
        }),
        (other, _) => Err(HandoverError::Unexpected {
            expected: "ready",
            got: format!("{other:?}"),
        }),
    }
}

/// The running gateway, seen from its successor until it released the sockets.
pub struct Predecessor {
    stream: UnixStream,
    pub pid: u32,
    notify_socket: Option<String>,
}

/// The sockets received, taken one by one as the configuration asks for them.
pub struct Inherited {
    pub cgroup: Option<PathBuf>,
    listeners: Vec<(SocketAddr, OwnedFd)>,
    admin: Option<(String, OwnedFd)>,
    upgrade: Option<(PathBuf, OwnedFd)>,
}

/// Connects to the gateway running on `path` and receives its offer.
pub fn take_over(path: &Path) -> Result<(Predecessor, Inherited), HandoverError> {
    OWNS_SOCKET_FILES.store(false, Ordering::SeqCst);
    let stream = UnixStream::connect(path).map_err(|source| HandoverError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(WireError::from)?;
    let (offer, fds) = match wire::recv(&stream)? {
        (Message::Offer(offer), fds) => (offer, fds),
        (other, _) => {
            return Err(HandoverError::Unexpected {
                expected: "an offer",
                got: format!("{other:?}"),
            });
        }
    };
    let named = offer.listeners.len()
        + usize::from(offer.admin.is_some())
        + 1
        + usize::from(offer.log_stream);
    if fds.len() != named {
        return Err(HandoverError::SocketCount {
            sockets: fds.len(),
            named,
        });
    }
    let mut fds = fds.into_iter();
    let listeners = offer.listeners.iter().copied().zip(fds.by_ref()).collect();
    let admin = offer
        .admin
        .clone()
        .zip(fds.next().filter(|_| offer.admin.is_some()));
    let upgrade = fds.next().map(|fd| (offer.upgrade_socket.clone(), fd));
    if let Some(log) = fds.next() {
        take_log_stream(log);
    }
    tracing::info!(
        predecessor = offer.pid,
        listeners = ?offer.listeners,
        cgroup = ?offer.cgroup,
        "upgrade: received the running gateway's sockets"
    );
    Ok((
        Predecessor {
            stream,
            pid: offer.pid,
            notify_socket: offer.notify_socket,
        },
        Inherited {
            cgroup: offer.cgroup,
            listeners,
            admin,
            upgrade,
        },
    ))
}

/// Started from a terminal, the successor logs where its predecessor did (the service's journal)
/// from now on; started by a service manager, it keeps its own log stream.
fn take_log_stream(log: OwnedFd) {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return;
    }
    eprintln!(
        "ntlm-tag: upgrade: logging to the running gateway's log (e.g. journalctl -u ntlm-tag) from now on"
    );
    if let Err(e) = rustix::stdio::dup2_stderr(&log) {
        tracing::warn!(error = %e, "cannot log to the running gateway's log stream; logging here");
    }
}

impl Inherited {
    /// The listening socket for `address`, if the predecessor had one.
    pub fn take_listener(&mut self, address: SocketAddr) -> Option<std::net::TcpListener> {
        let i = self.listeners.iter().position(|(a, _)| *a == address)?;
        Some(std::net::TcpListener::from(self.listeners.swap_remove(i).1))
    }

    /// The admin socket, if the predecessor's endpoint is `endpoint` too.
    pub fn take_admin(&mut self, endpoint: &str) -> Option<OwnedFd> {
        match self.admin.take() {
            Some((e, fd)) if e == endpoint => Some(fd),
            other => {
                self.admin = other;
                None
            }
        }
    }

    /// The upgrade socket, if the predecessor's is at `path` too.
    pub fn take_upgrade_socket(&mut self, path: &Path) -> Option<OwnedFd> {
        match self.upgrade.take() {
            Some((p, fd)) if p == path => Some(fd),
            other => {
                self.upgrade = other;
                None
            }
        }
    }

    /// Closes what the new configuration does not use, saying so.
    pub fn close_unused(self) {
        for (address, _) in &self.listeners {
            tracing::warn!(%address, "upgrade: the configuration no longer listens here; closing the listener the running gateway handed over");
        }
        if let Some((endpoint, _)) = &self.admin {
            tracing::info!(%endpoint, "upgrade: the admin endpoint changed; closing the old one");
        }
        if let Some((path, _)) = &self.upgrade {
            tracing::info!(path = %path.display(), "upgrade: upgrade_socket changed; closing the old one");
        }
    }
}

impl Predecessor {
    /// Tells the predecessor this process is ready and waits until it stopped accepting. Returns
    /// (connections it accepted from the queue while letting go, connections it keeps serving).
    /// Then follows the predecessor's drain reports into `metrics` until it exits.
    pub fn hand_over(
        self,
        uid_nonce: &str,
        metrics: Arc<Metrics>,
    ) -> Result<(usize, usize), HandoverError> {
        let ready = Message::Ready {
            pid: std::process::id(),
            uid_nonce: uid_nonce.to_string(),
        };
        wire::send(&self.stream, &ready, &[])?;
        let released = match wire::recv(&self.stream)? {
            (Message::Released { drained, draining }, _) => (drained, draining),
            (other, _) => {
                return Err(HandoverError::Unexpected {
                    expected: "released",
                    got: format!("{other:?}"),
                });
            }
        };
        OWNS_SOCKET_FILES.store(true, Ordering::SeqCst);
        if let Some(socket) = &self.notify_socket {
            announce_main_pid(socket);
        }
        metrics.predecessor_connections(released.1);
        let (stream, pid) = (self.stream, self.pid);
        let follow = move || follow_drain(&stream, pid, &metrics);
        if let Err(e) = std::thread::Builder::new()
            .name("ntlm-tag-drain".into())
            .spawn(follow)
        {
            tracing::warn!(error = %e, "cannot follow the old process's drain; its metrics stay as they are");
        }
        Ok(released)
    }
}

/// Reads the predecessor's drain reports until it exits (a thread of its own: a few blocking reads
/// over the whole drain).
fn follow_drain(stream: &UnixStream, pid: u32, metrics: &Metrics) {
    let _ = stream.set_read_timeout(None);
    loop {
        match wire::recv(stream) {
            Ok((Message::Draining { connections }, _)) => {
                metrics.predecessor_connections(connections);
            }
            Ok((Message::Drained { closed_at_deadline }, _)) => {
                metrics.predecessor_connections(0);
                metrics.predecessor_closed_at_deadline(closed_at_deadline);
                tracing::info!(
                    predecessor = pid,
                    closed_at_deadline,
                    "upgrade: the old process finished draining and exits"
                );
                return;
            }
            Ok((other, _)) => {
                tracing::debug!(message = ?other, "unexpected message from the old process");
            }
            Err(e) => {
                metrics.predecessor_connections(0);
                tracing::info!(predecessor = pid, reason = %e, "upgrade: the old process is gone");
                return;
            }
        }
    }
}

/// Tells systemd that this process is the service's main process now (needs `NotifyAccess=all`
/// in the unit: the message comes from a process that is not yet the main one). Written by hand
/// rather than with a crate because the socket comes from the predecessor, not the environment.
fn announce_main_pid(socket: &str) {
    let message = format!("MAINPID={}\nREADY=1\n", std::process::id());
    let sent = UnixDatagram::unbound().and_then(|s| match socket.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            s.send_to_addr(message.as_bytes(), &address)
        }
        None => s.send_to(message.as_bytes(), socket),
    });
    match sent {
        Ok(_) => tracing::info!("upgrade: told systemd this process is the main one now"),
        Err(e) => {
            tracing::warn!(error = %e, %socket, "upgrade: cannot tell systemd the new main pid; it may consider the service stopped when the old process exits (set NotifyAccess=all)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_learns_the_new_main_pid_on_a_path_or_an_abstract_socket() {
        let expected = format!("MAINPID={}\nREADY=1\n", std::process::id());
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).expect("bind");
        announce_main_pid(path.to_str().expect("utf-8"));
        let mut buf = [0u8; 128];
        let n = systemd.recv(&mut buf).expect("a notification");
        assert_eq!(std::str::from_utf8(&buf[..n]), Ok(expected.as_str()));

        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("ntlm-tag-test-notify-{}", std::process::id());
        let address =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let systemd = UnixDatagram::bind_addr(&address).expect("bind abstract");
        announce_main_pid(&format!("@{name}"));
        let n = systemd.recv(&mut buf).expect("a notification");
        assert_eq!(std::str::from_utf8(&buf[..n]), Ok(expected.as_str()));
    }
}
