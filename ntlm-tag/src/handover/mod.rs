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
//! XDP links travel with the sockets. The new process attaches nothing to the interfaces they are
//! attached to (a second XDP link on an interface is refused): just before `Ready` it swaps its
//! own program into each link, atomically, so that decapsulation never stops.
//!
//! Until `Released`, the old process is unchanged: a successor that fails or disconnects earlier
//! changes nothing. One that fails after swapping its XDP program in swaps the old process's back
//! (the offer carries that program too); and the old process, after every offer that did not end
//! in `Ready` or `Released`, checks that its links run its own program and puts it back if not
//! (a successor that died before it could).
#![forbid(unsafe_code)]

mod offer;
mod take_over;
pub mod wire;

use std::{
    io,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

pub use offer::{DrainReports, Handover, Successor, UpgradeSocket, offer_to_successors};
pub use take_over::{Inherited, MainPidNotice, Predecessor, XdpTaken, take_over};
pub use wire::{Message, Offer, OfferedXdp, WireError};

/// How long each side waits for the other's next message: the successor's start-up (loading the
/// kernel programs) happens in between, which takes seconds on a slow machine.
pub(super) const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether the socket files (admin, upgrade) are this process's to remove at exit: not while a
/// successor is taking over from a running gateway (they are the running one's until it releases
/// them), and not after this process handed them to a successor.
pub(super) static OWNS_SOCKET_FILES: AtomicBool = AtomicBool::new(true);

pub fn owns_socket_files() -> bool {
    OWNS_SOCKET_FILES.load(Ordering::SeqCst)
}

/// Set once this process released its sockets to a successor: from then on it is not the
/// service's main process, and must not tell the service manager that the service stops.
pub(super) static HANDED_OVER: AtomicBool = AtomicBool::new(false);

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
    #[error("not ready to take over within --ready-timeout; the running gateway keeps serving")]
    NotReadyInTime,
    #[error("hand-over: {0}")]
    Wire(#[from] WireError),
}
