//! The new process's side: it connects to the running gateway's upgrade socket, takes the sockets
//! over, says when it is ready, and follows the old process's drain.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    os::{
        fd::OwnedFd,
        unix::net::{UnixDatagram, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use super::{
    HandoverError, OWNS_SOCKET_FILES, STEP_TIMEOUT,
    wire::{self, Message, Offer, OfferedXdp, WireError},
};
use crate::metrics::Metrics;

/// The running gateway, seen from its successor until it released the sockets.
pub struct Predecessor {
    stream: UnixStream,
    pub pid: u32,
    notify_socket: Option<String>,
    /// The process that started this one (the hand-over script, or `ntlm-tag upgrade` typed at a
    /// terminal), which exits once it read the line that says the hand-over is done.
    started_by: u32,
}

/// How long the successor waits for the process that started it to exit before it names itself
/// the main process anyway. That process exits as soon as it read one line: milliseconds.
const ADOPTION_WAIT: Duration = Duration::from_secs(5);

/// How often the successor looks whether it has been re-parented. Polled because nothing signals
/// a new parent (a pidfd of the old one would, but needs `pidfd_open`, which older seccomp
/// filters refuse), and the wait is a few milliseconds.
const ADOPTION_POLL: Duration = Duration::from_millis(2);

/// `MAINPID=`, which the successor owes systemd once the hand-over is done and announced.
pub struct MainPidNotice {
    socket: String,
    started_by: u32,
}

/// The sockets received, taken one by one as the configuration asks for them.
pub struct Inherited {
    pub cgroup: Option<PathBuf>,
    listeners: Vec<(SocketAddr, OwnedFd)>,
    admin: Option<(String, OwnedFd)>,
    upgrade: Option<(PathBuf, OwnedFd)>,
    xdp: Option<Vec<(OfferedXdp, OwnedFd)>>,
    xdp_program: Option<OwnedFd>,
    xdp_netlink: Vec<String>,
}

/// The XDP links handed over, as (interface, mode, link), and the running gateway's program.
pub type XdpTaken = (Vec<(String, String, OwnedFd)>, Option<OwnedFd>);

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
    let (inherited, log) = Inherited::from_offer(&offer, fds)?;
    if let Some(log) = log {
        take_log_stream(log);
    }
    tracing::info!(
        predecessor = offer.pid,
        listeners = ?offer.listeners,
        cgroup = ?offer.cgroup,
        xdp = ?offer.xdp,
        "upgrade: received the running gateway's sockets"
    );
    Ok((
        Predecessor {
            stream,
            pid: offer.pid,
            notify_socket: offer.notify_socket,
            started_by: std::os::unix::process::parent_id(),
        },
        inherited,
    ))
}

/// Started from a terminal, the successor logs where its predecessor did (the service's journal)
/// from now on; started by a service manager, it keeps its own log stream.
pub(super) fn take_log_stream(log: OwnedFd) {
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
    /// Sorts the descriptors that came with `offer` (listeners, admin, upgrade socket, XDP links,
    /// in that order); the last one is the old process's log stream when the offer says so.
    fn from_offer(
        offer: &Offer,
        fds: Vec<OwnedFd>,
    ) -> Result<(Inherited, Option<OwnedFd>), HandoverError> {
        let named = offer.listeners.len()
            + usize::from(offer.admin.is_some())
            + 1
            + offer.xdp.as_ref().map_or(0, Vec::len)
            + usize::from(offer.xdp_program)
            + usize::from(offer.log_stream);
        if fds.len() != named {
            return Err(HandoverError::SocketCount {
                sockets: fds.len(),
                named,
            });
        }
        let mut fds = fds.into_iter();
        let listeners = offer.listeners.iter().copied().zip(fds.by_ref()).collect();
        let admin = match &offer.admin {
            Some(endpoint) => fds.next().map(|fd| (endpoint.clone(), fd)),
            None => None,
        };
        let upgrade = fds.next().map(|fd| (offer.upgrade_socket.clone(), fd));
        let xdp = offer
            .xdp
            .clone()
            .map(|xdp| xdp.into_iter().zip(fds.by_ref()).collect());
        let xdp_program = if offer.xdp_program { fds.next() } else { None };
        let inherited = Inherited {
            cgroup: offer.cgroup.clone(),
            listeners,
            admin,
            upgrade,
            xdp,
            xdp_program,
            xdp_netlink: offer.xdp_netlink.clone(),
        };
        Ok((inherited, fds.next()))
    }

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

    /// The XDP links handed over and the running gateway's program; `Err` with the reason when
    /// the running gateway cannot hand over XDP on one of `interfaces` (attached without a link, or
    /// a version that does not offer its links).
    pub fn take_xdp_links(&mut self, interfaces: &[String]) -> Result<XdpTaken, String> {
        let links = self.xdp.take();
        if !interfaces.is_empty() {
            if links.is_none() {
                return Err(
                    "the running gateway is a version that cannot hand its XDP attachment over; \
                     restart the service once (later upgrades take XDP over)"
                        .to_string(),
                );
            }
            if let Some(interface) = interfaces.iter().find(|i| self.xdp_netlink.contains(i)) {
                return Err(format!(
                    "the running gateway attached XDP to {interface} through netlink (this \
                     kernel has no XDP bpf_links), which cannot be handed over; restart the \
                     service instead"
                ));
            }
        }
        let links = links
            .unwrap_or_default()
            .into_iter()
            .map(|(x, fd)| (x.interface, x.mode, fd))
            .collect();
        Ok((links, self.xdp_program.take()))
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
        for (xdp, _) in self.xdp.iter().flatten() {
            tracing::info!(interface = %xdp.interface, "upgrade: this process runs no XDP program; the interface keeps the old process's until that process exits");
        }
    }
}

impl Predecessor {
    /// Tells the predecessor this process is ready and waits until it stopped accepting. Returns
    /// (connections it accepted from the queue while letting go, connections it keeps serving),
    /// and, under systemd, the `MAINPID=` notice to send once the hand-over is announced. Then
    /// follows the predecessor's drain reports into `metrics` until it exits.
    pub fn hand_over(
        self,
        uid_nonce: &str,
        metrics: Arc<Metrics>,
    ) -> Result<((usize, usize), Option<MainPidNotice>), HandoverError> {
        // From `Ready` on the predecessor stops accepting for this process: the start-up deadline
        // must not end it any more (and if it already fired, the process is exiting).
        if !crate::ready_deadline::disarm() {
            return Err(HandoverError::NotReadyInTime);
        }
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
        let notice = self.notify_socket.map(|socket| MainPidNotice {
            socket,
            started_by: self.started_by,
        });
        metrics.predecessor_connections(released.1);
        let (stream, pid) = (self.stream, self.pid);
        let follow = move || follow_drain(&stream, pid, &metrics);
        if let Err(e) = std::thread::Builder::new()
            .name("ntlm-tag-drain".into())
            .spawn(follow)
        {
            tracing::warn!(error = %e, "cannot follow the old process's drain; its metrics stay as they are");
        }
        Ok((released, notice))
    }
}

impl MainPidNotice {
    /// Tells systemd that this process is the main one, once it is systemd's child: the process
    /// that started it exits after reading the line that says the hand-over is done, and the
    /// kernel gives this one to init. systemd (252 at least) takes a main process that is not its
    /// child for one it cannot wait for: a stop sends it SIGTERM and, when nothing else is left in
    /// the unit to wait for, SIGKILL at once, so it would never drain. Blocks for that wait
    /// (milliseconds; at most [`ADOPTION_WAIT`]).
    pub fn send(self) {
        if !wait_until_adopted(self.started_by, ADOPTION_WAIT) {
            tracing::warn!(
                parent = self.started_by,
                waited_secs = ADOPTION_WAIT.as_secs(),
                "upgrade: the process that started this one is still running; telling systemd \
                 this is the main process anyway, but systemd cannot wait for a main process that \
                 is not its child: a stop then kills it without a drain. Hand over with \
                 `systemctl reload` (the unit's hand-over), or start `ntlm-tag upgrade` from a \
                 command that exits once it printed its line"
            );
        }
        announce_main_pid(&self.socket);
    }
}

/// Waits until this process's parent is no longer `started_by` (it exited, and the kernel
/// re-parented this process to init or a subreaper); true if it happened within `within`. A
/// process started by init itself has nothing to wait for.
fn wait_until_adopted(started_by: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while started_by != 1 && std::os::unix::process::parent_id() == started_by {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(ADOPTION_POLL);
    }
    true
}

/// Reads the predecessor's drain reports until it exits (a thread of its own: a few blocking reads
/// over the whole drain).
pub(super) fn follow_drain(stream: &UnixStream, pid: u32, metrics: &Metrics) {
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
pub(super) fn announce_main_pid(socket: &str) {
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
    use crate::handover::Handover;
    use std::net::TcpListener;

    /// A socket standing for any descriptor in an offer: its address tells which one arrived where.
    fn stand_in() -> (SocketAddr, OwnedFd) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        (l.local_addr().expect("addr"), OwnedFd::from(l))
    }

    fn addr_of(fd: OwnedFd) -> SocketAddr {
        TcpListener::from(fd).local_addr().expect("addr")
    }

    /// What a successor receives for `handover`: the offer and duplicates of its descriptors.
    fn received(handover: &Handover) -> (Offer, Vec<OwnedFd>) {
        let (offer, fds) = handover.offer();
        let fds = fds
            .iter()
            .map(|fd| fd.try_clone_to_owned().expect("dup"))
            .collect();
        (offer, fds)
    }

    fn handover_of(admin: bool, xdp: &[(&str, &str)]) -> (Handover, Vec<SocketAddr>) {
        let (listener, listener_fd) = stand_in();
        let (upgrade, upgrade_fd) = stand_in();
        let links: Vec<_> = xdp.iter().map(|_| stand_in()).collect();
        let mut expected = vec![listener, upgrade];
        expected.extend(links.iter().map(|(a, _)| *a));
        let handover = Handover {
            pid: 7,
            cgroup: None,
            listeners: vec![(listener, listener_fd)],
            admin: admin.then(|| ("unix:/run/ntlm-tag/admin.sock".to_string(), stand_in().1)),
            upgrade: upgrade_fd,
            upgrade_path: PathBuf::from("/run/ntlm-tag/upgrade.sock"),
            xdp: xdp
                .iter()
                .zip(links)
                .map(|((interface, mode), (_, fd))| {
                    let offered = OfferedXdp {
                        interface: interface.to_string(),
                        mode: mode.to_string(),
                    };
                    (offered, fd)
                })
                .collect(),
            xdp_program: Some(stand_in().1),
            xdp_netlink: Vec::new(),
        };
        (handover, expected)
    }

    #[test]
    fn xdp_links_arrive_named_by_their_interfaces_after_the_upgrade_socket() {
        for admin in [true, false] {
            let (handover, expected) =
                handover_of(admin, &[("eth1", "native"), ("eth2", "generic")]);
            let (offer, fds) = received(&handover);
            let (mut inherited, _log) = Inherited::from_offer(&offer, fds).expect("sorted");
            let upgrade = inherited
                .take_upgrade_socket(Path::new("/run/ntlm-tag/upgrade.sock"))
                .expect("the upgrade socket");
            assert_eq!(addr_of(upgrade), expected[1], "admin: {admin}");
            let (links, program) = inherited
                .take_xdp_links(&["eth2".to_string()])
                .expect("links handed over");
            assert!(program.is_some(), "the running gateway's program");
            let got: Vec<_> = links
                .into_iter()
                .map(|(interface, mode, fd)| (interface, mode, addr_of(fd)))
                .collect();
            assert_eq!(
                got,
                vec![
                    ("eth1".to_string(), "native".to_string(), expected[2]),
                    ("eth2".to_string(), "generic".to_string(), expected[3]),
                ]
            );
        }
    }

    #[test]
    fn xdp_that_cannot_be_handed_over_is_refused_only_when_configured() {
        // A predecessor that offers no links (an older version) or attached through netlink.
        let (handover, _) = handover_of(true, &[]);
        let (mut offer, fds) = received(&handover);
        offer.xdp = None;
        let (mut older, _) = Inherited::from_offer(&offer, fds).expect("sorted");
        assert_eq!(older.take_xdp_links(&[]).map(|(l, _)| l.len()), Ok(0));
        let refused = older
            .take_xdp_links(&["eth1".to_string()])
            .expect_err("refused");
        assert!(refused.contains("restart the service once"), "{refused}");

        let (mut handover, _) = handover_of(true, &[]);
        handover.xdp_netlink = vec!["eth1".to_string()];
        let (offer, fds) = received(&handover);
        let (mut netlink, _) = Inherited::from_offer(&offer, fds).expect("sorted");
        let refused = netlink
            .take_xdp_links(&["eth0".to_string(), "eth1".to_string()])
            .expect_err("refused");
        assert!(refused.contains("eth1 through netlink"), "{refused}");
    }

    #[test]
    fn an_offer_whose_descriptors_do_not_match_is_refused() {
        let (handover, _) = handover_of(true, &[("eth1", "native")]);
        let (offer, mut fds) = received(&handover);
        fds.pop();
        assert!(matches!(
            Inherited::from_offer(&offer, fds),
            Err(HandoverError::SocketCount { .. })
        ));
    }

    #[test]
    fn the_main_pid_waits_for_the_starting_process_to_exit_but_not_forever() {
        // The test runner that started this process outlives the test: never adopted (unless
        // the runner is init, which is never waited for).
        let started = Instant::now();
        assert!(!wait_until_adopted(
            std::os::unix::process::parent_id(),
            Duration::from_millis(50)
        ));
        assert!(started.elapsed() >= Duration::from_millis(50));
        // A parent that is not this process's any more (it exited): adopted at once.
        assert!(wait_until_adopted(u32::MAX, Duration::ZERO));
        // Started by init itself: nothing to wait for.
        assert!(wait_until_adopted(1, Duration::ZERO));
    }

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
