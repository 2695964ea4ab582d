//! The stop and reload signals.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use tokio::signal::unix::SignalKind;

pub(super) enum Signal {
    Reload,
    Stop,
}

/// The stop and reload signals, installed once before the gateway says it is ready: a signal sent
/// right after the ready line must be handled, not kill the process by its default action.
pub(super) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub(super) fn install() -> Result<Self> {
        let install = |kind: SignalKind, name: &str| {
            tokio::signal::unix::signal(kind)
                .with_context(|| format!("cannot install the {name} handler"))
        };
        Ok(Self {
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
            hup: install(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    pub(super) async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => {
                tracing::info!("SIGTERM received");
                Signal::Stop
            }
            _ = self.int.recv() => {
                tracing::info!("SIGINT received");
                Signal::Stop
            }
            _ = self.hup.recv() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                Signal::Reload
            }
        }
    }
}
