//! The running process's side: it listens on the upgrade socket, offers its sockets to a successor,
//! and once released reports how its own connections drain.
#![forbid(unsafe_code)]

use std::{
    io,
    net::SocketAddr,
    os::{
        fd::{AsFd, OwnedFd},
        unix::{
            fs::{FileTypeExt as _, PermissionsExt as _},
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::sync::{mpsc, watch};

use super::{
    HANDED_OVER, HandoverError, OWNS_SOCKET_FILES, STEP_TIMEOUT, owns_socket_files,
    wire::{self, Message, Offer, OfferedXdp, WireError},
};

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
    /// The XDP links (a successor swaps its program into them).
    pub xdp: Vec<(OfferedXdp, OwnedFd)>,
    /// The XDP program, for a successor that fails after swapping its own in.
    pub xdp_program: Option<OwnedFd>,
    /// Interfaces with XDP attached through netlink (nothing to hand over).
    pub xdp_netlink: Vec<String>,
}

impl Handover {
    pub(super) fn offer(&self) -> (Offer, Vec<std::os::fd::BorrowedFd<'_>>) {
        let log_stream = !std::io::IsTerminal::is_terminal(&std::io::stderr());
        let mut fds: Vec<_> = self.listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
        fds.extend(self.admin.iter().map(|(_, fd)| fd.as_fd()));
        fds.push(self.upgrade.as_fd());
        fds.extend(self.xdp.iter().map(|(_, fd)| fd.as_fd()));
        fds.extend(self.xdp_program.iter().map(|fd| fd.as_fd()));
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
            xdp: Some(self.xdp.iter().map(|(x, _)| x.clone()).collect()),
            xdp_program: self.xdp_program.is_some(),
            xdp_netlink: self.xdp_netlink.clone(),
            log_stream,
        };
        (offer, fds)
    }
}

pub(super) fn stderr_fd() -> std::os::fd::BorrowedFd<'static> {
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
/// user, or that fails before it is ready, changes nothing: `after_failure` undoes what such a
/// successor may have done (swapped its XDP program into this process's links).
pub async fn offer_to_successors(
    socket: UpgradeSocket,
    handover: Arc<Handover>,
    ready: mpsc::Sender<Successor>,
    mut stop: watch::Receiver<bool>,
    after_failure: impl Fn() + Send + 'static,
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
                after_failure();
                tracing::warn!(error = %e, "upgrade did not happen; this process keeps serving as before")
            }
            Err(e) => {
                after_failure();
                tracing::error!(error = %e, "upgrade: the hand-over task failed")
            }
        }
    }
}

/// One successor: checks who it is, sends the offer, waits until it is ready.
pub(super) fn offer(stream: UnixStream, handover: &Handover) -> Result<Successor, HandoverError> {
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
