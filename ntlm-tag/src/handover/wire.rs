//! The hand-over protocol on the upgrade socket: one JSON line per message, the sockets handed over
//! travelling with the first byte of a message as SCM_RIGHTS. Messages may follow each other
//! without an answer in between (the drain reports), so a reader reads a byte at a time and never
//! past the end of its message: a few small messages per upgrade, no buffer to keep.
#![forbid(unsafe_code)]

use std::{
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::PathBuf,
};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The most sockets one message carries (listeners, admin, upgrade socket).
pub const MAX_FDS: usize = 64;

/// A message longer than this is not one of ours.
const MAX_MESSAGE: usize = 64 * 1024;

/// What the two processes say to each other, in order: `Offer` (old → new, with the sockets),
/// `Ready` (new → old, once it can serve), `Released` (old → new, once it stopped accepting), then
/// `Draining` reports and a last `Drained` (old → new, for the new process's metrics).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "message", rename_all = "snake_case")]
pub enum Message {
    Offer(Offer),
    Ready {
        pid: u32,
        uid_nonce: String,
    },
    Released {
        /// Connections the old process accepted from its queue while letting go.
        drained: usize,
        /// Connections it keeps serving until they close or its deadline.
        draining: usize,
    },
    /// Old → new while the old process drains, when the number changed.
    Draining {
        connections: usize,
    },
    /// Old → new as it exits: how many connections its drain deadline closed.
    Drained {
        closed_at_deadline: usize,
    },
}

/// The old process's sockets and what the successor needs to continue where it stops.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Offer {
    pub pid: u32,
    /// The cgroup the listeners were created in: connections accepted from them belong to it, so
    /// the successor's kernel program must be attached there.
    pub cgroup: Option<PathBuf>,
    /// systemd's notification socket, so that the successor can announce itself as the main pid.
    pub notify_socket: Option<String>,
    /// The client listeners' addresses, in the order of the first sockets.
    pub listeners: Vec<SocketAddr>,
    /// The admin endpoint (as configured), whose socket follows the listeners'.
    pub admin: Option<String>,
    /// The upgrade socket's path; its listening socket comes last.
    pub upgrade_socket: PathBuf,
    /// The XDP links, one descriptor each after the upgrade socket's, in this order. Absent from
    /// the offers of versions that could not hand XDP over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xdp: Option<Vec<OfferedXdp>>,
    /// The old process's XDP program follows the links (for the successor to swap back should it
    /// fail after swapping its own in).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub xdp_program: bool,
    /// Interfaces with XDP attached without a link (netlink): they cannot be handed over.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xdp_netlink: Vec<String>,
    /// The old process's stderr follows (its log stream, e.g. the journal's).
    pub log_stream: bool,
}

/// One XDP link in an offer: the interface it is attached to and its mode.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OfferedXdp {
    pub interface: String,
    /// `native` or `generic`.
    pub mode: String,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the other process closed the upgrade connection")]
    Closed,
    #[error("upgrade connection: {0}")]
    Io(#[from] io::Error),
    #[error("not a hand-over message: {0}")]
    Malformed(String),
}

/// Sends `message` with `fds` attached.
pub fn send(socket: impl AsFd, message: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
    let mut line = serde_json::to_vec(message).map_err(|e| WireError::Malformed(e.to_string()))?;
    line.push(b'\n');
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(WireError::Malformed(format!(
            "{} sockets are more than one message carries ({MAX_FDS})",
            fds.len()
        )));
    }
    let mut sent = rustix::net::sendmsg(
        &socket,
        &[IoSlice::new(&line)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(io::Error::from)?;
    while sent < line.len() {
        let mut none = SendAncillaryBuffer::default();
        sent += rustix::net::sendmsg(
            &socket,
            &[IoSlice::new(&line[sent..])],
            &mut none,
            SendFlags::NOSIGNAL,
        )
        .map_err(io::Error::from)?;
    }
    Ok(())
}

/// Receives one message and the sockets that came with it (close-on-exec).
pub fn recv(socket: impl AsFd) -> Result<(Message, Vec<OwnedFd>), WireError> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 1];
    loop {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &socket,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if got.bytes == 0 {
            return Err(WireError::Closed);
        }
        line.extend_from_slice(&buf[..got.bytes]);
        if line.last() == Some(&b'\n') {
            break;
        }
        if line.len() > MAX_MESSAGE {
            return Err(WireError::Malformed(format!(
                "longer than {MAX_MESSAGE} bytes"
            )));
        }
    }
    let message = serde_json::from_slice(&line).map_err(|e| WireError::Malformed(e.to_string()))?;
    Ok((message, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::{fd::AsRawFd, unix::net::UnixStream};

    #[test]
    fn a_message_and_its_sockets_arrive_together() {
        let (a, b) = UnixStream::pair().expect("pair");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let offer = Message::Offer(Offer {
            pid: 7,
            cgroup: Some(PathBuf::from("/sys/fs/cgroup/x/ntlm-tag.7")),
            notify_socket: None,
            listeners: vec![listener.local_addr().expect("addr")],
            admin: None,
            upgrade_socket: PathBuf::from("/run/ntlm-tag/upgrade.sock"),
            xdp: Some(Vec::new()),
            xdp_program: false,
            xdp_netlink: Vec::new(),
            log_stream: false,
        });
        send(&a, &offer, &[listener.as_fd()]).expect("send");
        let (got, fds) = recv(&b).expect("recv");
        assert_eq!(got, offer);
        assert_eq!(fds.len(), 1);
        assert_ne!(fds[0].as_raw_fd(), listener.as_raw_fd(), "a new descriptor");
        let passed = std::net::TcpListener::from(fds.into_iter().next().expect("fd"));
        assert_eq!(passed.local_addr().ok(), listener.local_addr().ok());
    }

    #[test]
    fn messages_sent_back_to_back_are_read_one_at_a_time() {
        let (a, b) = UnixStream::pair().expect("pair");
        let first = Message::Released {
            drained: 0,
            draining: 0,
        };
        let second = Message::Drained {
            closed_at_deadline: 0,
        };
        send(&a, &first, &[]).expect("send");
        send(&a, &second, &[]).expect("send");
        assert_eq!(recv(&b).expect("first").0, first);
        assert_eq!(recv(&b).expect("second").0, second);
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_message() {
        let (a, b) = UnixStream::pair().expect("pair");
        drop(a);
        assert!(matches!(recv(&b), Err(WireError::Closed)));
    }
}
