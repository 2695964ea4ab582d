//! What an accept loop does when `accept` fails: a connection that died in the queue is skipped
//! at once; running out of descriptors or memory pauses accepting (the kernel keeps queueing new
//! connections meanwhile) while established connections go on being served, and says once per
//! interval what to raise, instead of a warning per attempt.

use std::{
    io,
    time::{Duration, Instant},
};

/// The first pause after a failed accept; it doubles while accepts keep failing.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// The longest pause: a freed descriptor is used within this (nginx waits 500 ms too).
const LONGEST_PAUSE: Duration = Duration::from_millis(500);
/// At most one warning per listener in this interval; the next one counts the failures between.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Why an accept failed, as far as the operator's fix goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptFailure {
    /// The connection was reset or refused before it was accepted: nothing to fix, accept the next.
    ConnectionGone,
    /// EMFILE: the process's descriptor limit.
    ProcessDescriptors,
    /// ENFILE: the system's descriptor limit.
    SystemDescriptors,
    /// ENOBUFS/ENOMEM: socket memory.
    Memory,
    Other,
}

impl AcceptFailure {
    pub fn of(e: &io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ECONNABORTED | libc::EPROTO | libc::EPERM | libc::EINTR) => {
                AcceptFailure::ConnectionGone
            }
            Some(libc::EMFILE) => AcceptFailure::ProcessDescriptors,
            Some(libc::ENFILE) => AcceptFailure::SystemDescriptors,
            Some(libc::ENOBUFS | libc::ENOMEM) => AcceptFailure::Memory,
            _ => AcceptFailure::Other,
        }
    }

    /// What the operator should raise.
    fn remedy(self) -> &'static str {
        match self {
            AcceptFailure::ProcessDescriptors => {
                "raise LimitNOFILE= in the systemd unit (or `ulimit -n`), or lower limits.max_connections"
            }
            AcceptFailure::SystemDescriptors => "raise the system's fs.file-max (sysctl)",
            AcceptFailure::Memory => {
                "the system is short of socket memory (net.ipv4.tcp_mem, free memory)"
            }
            AcceptFailure::ConnectionGone | AcceptFailure::Other => "see the error",
        }
    }
}

/// One listener's accept failures: how long to pause, and when to warn.
#[derive(Debug)]
pub struct AcceptErrors {
    listener: String,
    pause: Duration,
    /// Failures since the last warning.
    unreported: u64,
    last_warning: Option<Instant>,
}

impl AcceptErrors {
    pub fn new(listener: impl Into<String>) -> Self {
        AcceptErrors {
            listener: listener.into(),
            pause: FIRST_PAUSE,
            unreported: 0,
            last_warning: None,
        }
    }

    /// An accept succeeded: the next failure pauses briefly again.
    pub fn accepted(&mut self) {
        self.pause = FIRST_PAUSE;
    }

    /// Records a failed accept, warns if the interval allows, and returns how long to pause before
    /// the next accept (zero when the failure was the connection's own). tokio keeps a listener
    /// readable after any error but `WouldBlock`, so without the pause the loop would spin.
    pub fn failed(&mut self, e: &io::Error, open_connections: usize) -> Duration {
        let failure = AcceptFailure::of(e);
        if failure == AcceptFailure::ConnectionGone {
            tracing::debug!(listener = %self.listener, error = %e, "a connection ended before it was accepted");
            return Duration::ZERO;
        }
        self.unreported += 1;
        let now = Instant::now();
        if self
            .last_warning
            .is_none_or(|last| now.duration_since(last) >= WARN_INTERVAL)
        {
            let nofile = crate::descriptors::soft_limit();
            tracing::warn!(
                listener = %self.listener,
                error = %e,
                failed_accepts = self.unreported,
                open_connections,
                descriptor_limit = nofile.map(tracing::field::display),
                interval_secs = WARN_INTERVAL.as_secs(),
                "cannot accept new connections; they wait in the kernel's queue, established connections are still served; {}",
                failure.remedy()
            );
            self.unreported = 0;
            self.last_warning = Some(now);
        }
        let pause = self.pause;
        self.pause = (self.pause * 2).min(LONGEST_PAUSE);
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    #[test]
    fn a_connection_gone_before_accept_is_skipped_without_a_pause() {
        let mut errors = AcceptErrors::new("test");
        assert_eq!(errors.failed(&os(libc::ECONNABORTED), 0), Duration::ZERO);
        assert_eq!(errors.unreported, 0);
    }

    #[test]
    fn running_out_of_descriptors_pauses_longer_each_time_up_to_a_bound_and_warns_once() {
        let mut errors = AcceptErrors::new("test");
        let pauses: Vec<_> = (0..10)
            .map(|_| errors.failed(&os(libc::EMFILE), 5))
            .collect();
        assert_eq!(pauses[0], FIRST_PAUSE);
        assert_eq!(pauses[1], FIRST_PAUSE * 2);
        assert_eq!(*pauses.last().expect("pauses"), LONGEST_PAUSE);
        // One warning (the first), then the failures are counted for the next one.
        assert_eq!(errors.unreported, 9);
        errors.accepted();
        assert_eq!(errors.failed(&os(libc::EMFILE), 5), FIRST_PAUSE);
    }
}
