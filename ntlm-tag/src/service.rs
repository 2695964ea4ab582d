//! Telling systemd what the gateway is doing (`Type=notify`, sd_notify(3)): `READY=1` once every
//! listener is bound and the kernel programs are attached, a `STATUS=` line kept current,
//! `RELOADING=1` (with `MONOTONIC_USEC`, as the notify-reload protocol wants) then `READY=1`
//! around a reload, `STOPPING=1` at shutdown. Started without `NOTIFY_SOCKET` (by hand, by a test,
//! by another supervisor), every call does nothing.
#![forbid(unsafe_code)]

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sd_notify::NotifyState;
use tokio::sync::watch;

/// How often the status line is refreshed between events (`systemctl status` shows the last one).
pub const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// A refused reload's reason is cut to this many characters in the status line (the log has it all).
const REASON_CHARS: usize = 160;

/// What the status line reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub connections: usize,
    pub backends_up: usize,
    pub backends: usize,
}

/// The connection to the service manager (systemd), if the gateway was started by one.
pub struct ServiceManager {
    enabled: bool,
    /// A failed notification is logged once; systemd then sees the start time out or the status
    /// go stale, and the log says why.
    warned: AtomicBool,
    /// The last refused reload, shown in the status line until a reload succeeds.
    refused_reload: Mutex<Option<String>>,
}

impl ServiceManager {
    /// Notifies when `NOTIFY_SOCKET` is set, as systemd sets it for `Type=notify` units.
    pub fn from_env() -> Self {
        ServiceManager {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            warned: AtomicBool::new(false),
            refused_reload: Mutex::new(None),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Start-up is complete: listeners bound, kernel programs attached, user switched.
    pub fn ready(&self, now: &Snapshot) {
        let status = self.status_line(now);
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
    }

    /// A reload begins; the unit shows `reloading` until [`reloaded`](Self::reloaded).
    pub fn reloading(&self) {
        let mut states = vec![
            NotifyState::Reloading,
            NotifyState::Status("reloading the configuration"),
        ];
        // systemd 253+ (notify-reload) matches RELOADING=1 to its own reload request by this
        // timestamp; older versions ignore it.
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        self.send(&states);
    }

    /// A reload ended (applied, or refused with `Err(reason)`): back to ready, with a status line
    /// that keeps a refusal visible in `systemctl status`.
    pub fn reloaded(&self, outcome: Result<(), &str>, now: &Snapshot) {
        if let Ok(mut refused) = self.refused_reload.lock() {
            *refused = outcome.err().map(one_line);
        }
        let status = self.status_line(now);
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
    }

    /// A refreshed status line.
    pub fn status(&self, now: &Snapshot) {
        let status = self.status_line(now);
        self.send(&[NotifyState::Status(&status)]);
    }

    /// Shutdown begins: no new connections, `connections` draining.
    pub fn stopping(&self, connections: usize) {
        let status = format!("stopping: draining {connections} connection(s)");
        self.send(&[NotifyState::Stopping, NotifyState::Status(&status)]);
    }

    fn status_line(&self, now: &Snapshot) -> String {
        let refused = self.refused_reload.lock().ok().and_then(|r| r.clone());
        status_line(now, refused.as_deref())
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states)
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                error = %e,
                socket = ?std::env::var_os("NOTIFY_SOCKET"),
                "cannot notify the service manager (NOTIFY_SOCKET); systemd may time out the start \
                 or show a stale status. Is the socket reachable from the service's namespace?"
            );
        }
    }
}

/// `serving 3 connection(s), 2/2 backends up`, plus the last refused reload while there is one.
pub fn status_line(now: &Snapshot, refused_reload: Option<&str>) -> String {
    let mut line = format!(
        "serving {} connection(s), {}/{} backends up",
        now.connections, now.backends_up, now.backends
    );
    if let Some(reason) = refused_reload {
        line.push_str("; last reload refused: ");
        line.push_str(reason);
    }
    line
}

/// A reason on one line (STATUS= ends at a newline), cut to [`REASON_CHARS`].
fn one_line(reason: &str) -> String {
    let flat: String = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(REASON_CHARS) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat,
    }
}

/// Refreshes the status line every [`STATUS_INTERVAL`] until shutdown (only when notifying).
pub async fn keep_status_current(
    manager: std::sync::Arc<ServiceManager>,
    snapshot: impl Fn() -> Snapshot,
    mut shutdown: watch::Receiver<bool>,
) {
    if !manager.is_enabled() {
        return;
    }
    let mut ticks = tokio::time::interval(STATUS_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => manager.status(&snapshot()),
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Snapshot = Snapshot {
        connections: 3,
        backends_up: 1,
        backends: 2,
    };

    #[test]
    fn the_status_line_counts_connections_and_backends() {
        assert_eq!(
            status_line(&NOW, None),
            "serving 3 connection(s), 1/2 backends up"
        );
    }

    #[test]
    fn a_refused_reload_stays_in_the_status_line_on_one_line() {
        let reason = one_line("listen: \"x\" is not\nan address");
        assert_eq!(
            status_line(&NOW, Some(&reason)),
            "serving 3 connection(s), 1/2 backends up; last reload refused: listen: \"x\" is not an address"
        );
        let long = one_line(&"é".repeat(500));
        assert_eq!(long.chars().count(), REASON_CHARS + 1);
    }
}
