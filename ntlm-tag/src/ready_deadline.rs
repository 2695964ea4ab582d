//! The start-up deadline of `ntlm-tag upgrade`: a new process that is not ready to take over within
//! `--ready-timeout` exits 75 ([`EXIT_NOT_READY`]) saying what it was stuck on, so that a hand-over
//! always ends and leaves no stray process behind (the service manager only kills the command that
//! started it). Until it says `Ready`, the running gateway is unchanged by a successor that goes
//! away; from `Ready` on, the hand-over must complete (the running gateway stops accepting on it),
//! so [`disarm`] is called just before `Ready` is sent and the deadline can no longer fire.
//!
//! The deadline is `alarm(2)` and a `SIGALRM` handler rather than a watchdog thread: the process
//! must have a single thread when it switches user (every thread's credentials are checked after
//! the switch), and whatever blocks may be any system call (`open` on a FIFO that nobody writes, a
//! read on a stuck mount) before anything else runs. The handler only does what is
//! async-signal-safe: an atomic compare-and-swap, `write(2)` of a message formatted in advance, and
//! `_exit(2)`, which runs no destructor (the socket files belong to the running gateway).

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

/// Exit status of an `upgrade` that was not ready to take over in time (EX_TEMPFAIL: nothing
/// changed, try again once the cause is fixed).
pub const EXIT_NOT_READY: u8 = 75;

/// The default `--ready-timeout`: below the packaged hand-over script's own bound (75 s), itself
/// below the unit's `TimeoutStartSec=90`, which also bounds each `ExecReload=`.
pub const DEFAULT_READY_TIMEOUT_SECS: u64 = 60;

/// What the new process is doing, for the message the deadline prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    /// Reading the configuration file and what it names (certificates, keys, the admin token
    /// file, backend names).
    Configuration = 0,
    /// Connecting to the running gateway and receiving its sockets.
    Connecting = 1,
    /// Joining the cgroup, loading and attaching the kernel programs, binding new listeners,
    /// switching user.
    Kernel = 2,
    /// Building the gateway (TLS contexts, backends) before it says it is ready.
    Starting = 3,
}

const STEPS: [Step; 4] = [
    Step::Configuration,
    Step::Connecting,
    Step::Kernel,
    Step::Starting,
];

impl Step {
    fn doing(self) -> &'static str {
        match self {
            Step::Configuration => {
                "reading the configuration and the files it names (a certificate, key or token file \
                 that is a FIFO or on a mount that does not answer, a backend name the resolver \
                 does not answer for)"
            }
            Step::Connecting => {
                "taking the sockets over from the running gateway (it did not send its offer)"
            }
            Step::Kernel => "loading the kernel programs, binding the listeners or switching user",
            Step::Starting => {
                "starting the gateway (the TLS contexts and backends of the new configuration)"
            }
        }
    }
}

const IDLE: u8 = 0;
const ARMED: u8 = 1;
const DISARMED: u8 = 2;
const EXPIRED: u8 = 3;

static STATE: AtomicU8 = AtomicU8::new(IDLE);
static STEP: AtomicU8 = AtomicU8::new(Step::Configuration as u8);
/// One message per step, formatted before the alarm is set (the handler cannot allocate).
static MESSAGES: OnceLock<[String; 4]> = OnceLock::new();

/// Starts the deadline. Called once, first thing in `ntlm-tag upgrade`.
pub fn arm(timeout: Duration) -> std::io::Result<()> {
    let secs = timeout.as_secs().max(1);
    let _ = MESSAGES.set(STEPS.map(|step| message(step, secs)));
    install_handler()?;
    STATE.store(ARMED, Ordering::SeqCst);
    let secs = libc::c_uint::try_from(secs).unwrap_or(libc::c_uint::MAX);
    // SAFETY: alarm(2) takes a plain integer and cannot fail; it replaces no alarm of ours.
    unsafe { libc::alarm(secs) };
    Ok(())
}

/// What the process prints when the deadline passes during `step`.
fn message(step: Step, secs: u64) -> String {
    format!(
        "ntlm-tag: upgrade: not ready to take over within --ready-timeout ({secs} s), stuck {}; \
         exiting {EXIT_NOT_READY}. The running gateway keeps serving unchanged: fix what blocks \
         (`ntlm-tag check` on the same file blocks on it too) and upgrade again\n",
        step.doing()
    )
}

/// Records what the process does now, for the message.
pub fn entering(step: Step) {
    STEP.store(step as u8, Ordering::SeqCst);
}

/// Stops the deadline just before `Ready` is sent. False when it already fired (the process is
/// exiting: `Ready` must not be sent). True when it was never armed (`run`, tests).
pub fn disarm() -> bool {
    match STATE.compare_exchange(ARMED, DISARMED, Ordering::SeqCst, Ordering::SeqCst) {
        Ok(_) => {
            // SAFETY: alarm(0) cancels the pending alarm; it takes a plain integer.
            unsafe { libc::alarm(0) };
            true
        }
        Err(state) => state != EXPIRED,
    }
}

fn install_handler() -> std::io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value (no flags, empty mask) that is then filled in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_alarm as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // A system call the alarm interrupts after `disarm` resumes as if nothing happened.
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: `action` is initialised and names a handler that only calls async-signal-safe
    // functions; the old action is not wanted (null).
    if unsafe { libc::sigaction(libc::SIGALRM, &action, std::ptr::null_mut()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

extern "C" fn on_alarm(_signal: libc::c_int) {
    if STATE
        .compare_exchange(ARMED, EXPIRED, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return;
    }
    let step = usize::from(STEP.load(Ordering::SeqCst));
    if let Some(message) = MESSAGES.get().and_then(|m| m.get(step)) {
        // SAFETY: write(2) and _exit(2) are async-signal-safe; `message` is a String set before the
        // alarm was armed and never changed, so the pointer and length are valid.
        unsafe { libc::write(2, message.as_ptr().cast(), message.len()) };
    }
    // SAFETY: _exit(2) is async-signal-safe and ends the process without running destructors.
    unsafe { libc::_exit(libc::c_int::from(EXIT_NOT_READY)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_has_a_message_that_names_the_flag_and_the_status() {
        for step in STEPS {
            assert_eq!(STEPS[step as usize], step, "indexed by its value");
            let text = message(step, 7);
            assert!(text.contains("--ready-timeout (7 s)"), "{text}");
            assert!(text.contains(step.doing()), "{text}");
            assert!(text.contains("exiting 75."), "{text}");
            assert!(text.ends_with('\n'), "one line: {text}");
            assert_eq!(text.lines().count(), 1, "{text}");
        }
    }

    #[test]
    fn ready_may_be_sent_when_no_deadline_was_armed() {
        assert!(disarm());
    }
}
