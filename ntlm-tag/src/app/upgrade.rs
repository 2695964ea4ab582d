//! Both sides of an upgrade (`ntlm-tag upgrade`): the successor taking the listeners over, and the
//! predecessor handing them out and draining its own connections.
#![forbid(unsafe_code)]

use std::{io::Write as _, os::fd::OwnedFd, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use tokio_util::task::TaskTracker;

use super::{
    TOOK_OVER,
    signals::{Signal, Signals},
};
use crate::{
    admin::AdminListener,
    handover::{self, Handover, OfferedXdp, Predecessor, UpgradeSocket},
    kernel::{KernelTracker, XdpHandover},
    metrics::Metrics,
    proxy::{Gateway, ListenerConfig},
};

/// How often a process draining after an upgrade says how many connections it still serves.
pub(super) const DRAIN_PROGRESS_EVERY: Duration = Duration::from_secs(60);

/// How often the successor's metrics learn how many connections this process still serves.
pub(super) const REPORT_TO_SUCCESSOR_EVERY: Duration = Duration::from_secs(1);

/// After a hand-over: serves the remaining connections until the last one closes (true), or until
/// `timeouts.upgrade_drain_secs` passes or SIGTERM arrives (false: the caller closes them).
pub(super) async fn drain_after_upgrade(
    gateway: &Gateway,
    tracker: &TaskTracker,
    signals: &mut Signals,
    mut reports: Option<&mut handover::DrainReports>,
) -> bool {
    let open = || gateway.open.load(std::sync::atomic::Ordering::Relaxed);
    let mut report_every = tokio::time::interval(REPORT_TO_SUCCESSOR_EVERY);
    let deadline = tokio::time::Instant::now() + gateway.live.load().timeouts.upgrade_drain;
    let mut progress = tokio::time::interval_at(
        tokio::time::Instant::now() + DRAIN_PROGRESS_EVERY,
        DRAIN_PROGRESS_EVERY,
    );
    loop {
        tokio::select! {
            _ = tracker.wait() => {
                tracing::info!("upgrade: the last connection of this process closed; exiting");
                return true;
            }
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(
                    connections = open(),
                    "upgrade drain deadline passed (timeouts.upgrade_drain_secs); closing this \
                     process's remaining connections (their clients reconnect to the new process \
                     and log in again)"
                );
                return false;
            }
            _ = progress.tick() => {
                tracing::info!(connections = open(), "upgrade: still serving this process's connections");
            }
            _ = report_every.tick() => {
                if let Some(r) = reports.as_deref_mut() {
                    r.draining(open());
                }
            }
            signal = signals.next() => match signal {
                Signal::Stop => return false,
                Signal::Reload => tracing::info!(
                    "reload ignored: this process handed its listeners over and only drains; \
                     reload the new one"
                ),
            },
        }
    }
}

/// The successor's side of a hand-over: swaps its XDP program into the links the predecessor
/// handed over, then says it is ready, so the predecessor may stop accepting.
pub(super) async fn take_over(
    predecessor: Predecessor,
    kernel: Option<&KernelTracker>,
    uid_nonce: &str,
    metrics: Arc<Metrics>,
) -> Result<()> {
    let pid = predecessor.pid;
    // Last, just before `Ready`: the old process goes on with this process's XDP program only
    // for the moment until it stops accepting. Should the hand-over fail from here on, this
    // process swaps the old one's program back (and the old one checks its links too, in case
    // this process dies first).
    if let Some(k) = kernel
        && let Err(e) = k.take_over_xdp()
    {
        // Some links may run this process's program already.
        k.give_back_xdp();
        return Err(anyhow::Error::new(e)
            .context("cannot swap this process's XDP program into the running gateway's links"));
    }
    let nonce = uid_nonce.to_string();
    let handed = tokio::task::spawn_blocking(move || predecessor.hand_over(&nonce, metrics))
        .await
        .context("the hand-over task failed")
        .and_then(|r| {
            r.context("the running gateway did not release its listeners; it keeps serving")
        });
    let ((drained, draining), main_pid_notice) = match handed {
        Ok(released) => released,
        Err(e) => {
            // The running gateway goes on: with its own XDP program, not this process's.
            if let Some(k) = kernel {
                k.give_back_xdp();
            }
            return Err(e);
        }
    };
    tracing::info!(
        predecessor = pid,
        predecessor_accepted_from_queue = drained,
        predecessor_draining = draining,
        "upgrade: took the listeners over; the old process serves its own connections until they close"
    );
    // For whoever started `ntlm-tag upgrade` (an operator's terminal waits for this line). Best
    // effort: nobody may be reading any more, and that must not stop the gateway.
    let _ = writeln!(
        std::io::stdout(),
        "{TOOK_OVER}: pid {} serves new connections; pid {pid} serves its {draining} until they close",
        std::process::id()
    );
    let _ = std::io::stdout().flush();
    // Only now, once whoever started this process has read the line above and exited: see
    // `MainPidNotice::send`. Before the admin endpoint serves, so that the unit's second
    // `ExecReload=` (`ntlm-tag reload` on that endpoint) keeps systemd's reload job open until
    // systemd knows the new main process.
    // The listeners are this process's now: a failure here must not end it.
    if let Some(notice) = main_pid_notice
        && let Err(e) = tokio::task::spawn_blocking(move || notice.send()).await
    {
        tracing::warn!(error = %e, "upgrade: cannot tell systemd the new main pid");
    }
    Ok(())
}

/// Second descriptors of the sockets and XDP links, and the cgroup the sockets belong to, for a
/// successor.
pub(super) fn handover_sockets(
    listeners: &[(std::net::TcpListener, Arc<ListenerConfig>)],
    admin: Option<(&AdminListener, String)>,
    upgrade: &UpgradeSocket,
    kernel: Option<&KernelTracker>,
) -> std::io::Result<Handover> {
    let listeners = listeners
        .iter()
        .map(|(l, _)| Ok((l.local_addr()?, OwnedFd::from(l.try_clone()?))))
        .collect::<std::io::Result<_>>()?;
    let admin = match admin {
        Some((listener, endpoint)) => Some((endpoint, listener.dup()?)),
        None => None,
    };
    let xdp = match kernel {
        Some(k) => k.xdp_handover()?,
        None => XdpHandover::default(),
    };
    Ok(Handover {
        pid: std::process::id(),
        cgroup: kernel.map(|k| k.cgroup_path().to_path_buf()),
        listeners,
        admin,
        upgrade: upgrade.dup()?,
        upgrade_path: upgrade.path().to_path_buf(),
        xdp: xdp
            .links
            .into_iter()
            .map(|l| {
                let offered = OfferedXdp {
                    interface: l.interface,
                    mode: l.mode.to_string(),
                };
                (offered, l.link)
            })
            .collect(),
        xdp_program: xdp.program,
        xdp_netlink: xdp.netlink,
    })
}
