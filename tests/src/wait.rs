//! Waiting in tests: one polling helper, and the time scale that stretches every deadline that only
//! exists to fail a stuck test (TCG VMs run everything many times slower).

use std::time::{Duration, Instant};

/// Environment variable with a factor (an integer, 1 by default) by which the harness's waits for
/// a gateway grow: `cargo xtask integration-test` sets it in VMs, where everything runs many times
/// slower than on the host (under TCG, a gateway takes seconds to load its programs, not 0.1 s).
pub const TIME_SCALE_ENV: &str = "NTLM_TAG_TEST_TIME_SCALE";

/// The factor from [`TIME_SCALE_ENV`] (at least 1).
pub fn time_scale() -> u32 {
    static SCALE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *SCALE.get_or_init(|| {
        std::env::var(TIME_SCALE_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(1)
            .max(1)
    })
}

/// `d` times [`time_scale`]: for deadlines that only exist to fail a stuck test, never for ones a
/// test asserts on (those must hold on any machine).
pub fn scaled(d: Duration) -> Duration {
    d * time_scale()
}

/// How long [`eventually`] polls before it fails the test (times [`time_scale`]).
pub const EVENTUALLY: Duration = Duration::from_secs(15);

/// Polls `probe` until `check` accepts its value (then returns it), for up to [`EVENTUALLY`]
/// (scaled); panics with `what` and the last value otherwise.
pub fn eventually<T: std::fmt::Debug>(
    what: &str,
    probe: impl FnMut() -> T,
    check: impl Fn(&T) -> bool,
) -> T {
    eventually_within(what, scaled(EVENTUALLY), probe, check)
}

/// [`eventually`] with a deadline of the caller's (already scaled where it only stops a stuck
/// test): polls every 10 ms, so a waiter sees a change at once.
pub fn eventually_within<T: std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> T,
    check: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let value = probe();
        if check(&value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {value:#?} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
