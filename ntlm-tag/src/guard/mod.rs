//! Auth-aware connections and lockout protection: who each client connection authenticated as,
//! and a gateway that stops a client looping on a bad password before the domain locks the account.
#![forbid(unsafe_code)]

pub mod auth_state;
pub mod lockout;

use std::{fmt::Write as _, sync::atomic::Ordering};

pub use auth_state::{AuthState, Leg};
pub use lockout::{KeyKind, LockoutConfig, LockoutGuard, Verdict};

/// Prometheus text for the auth states of open connections (`by_state`, in
/// [`auth_state::STATE_NAMES`] order) and the lockout guard. Never labelled by user name.
pub fn render_metrics(by_state: [u64; 4], guard: &LockoutGuard) -> String {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    let header = |out: &mut String, name: &str, help: &str, kind: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };
    header(
        &mut out,
        "ntlm_tag_connections_by_auth_state",
        "Client connections open now, by NTLM/Negotiate state.",
        "gauge",
    );
    for (name, n) in auth_state::STATE_NAMES.iter().zip(by_state) {
        let _ = writeln!(
            out,
            "ntlm_tag_connections_by_auth_state{{state=\"{name}\"}} {n}"
        );
    }
    header(
        &mut out,
        "ntlm_tag_lockout_failures_total",
        "Failed NTLM logins counted by the lockout guard (a Type3 answered with 401).",
        "counter",
    );
    let _ = writeln!(
        out,
        "ntlm_tag_lockout_failures_total {}",
        get(&guard.counters.failures)
    );
    header(
        &mut out,
        "ntlm_tag_lockout_refused_total",
        "Logins refused with 429 before the backend, by the count that was over its threshold.",
        "counter",
    );
    for (name, n) in lockout::KEY_KIND_NAMES.iter().zip(&guard.counters.refused) {
        let _ = writeln!(
            out,
            "ntlm_tag_lockout_refused_total{{key=\"{name}\"}} {}",
            get(n)
        );
    }
    header(
        &mut out,
        "ntlm_tag_lockout_tracked_keys",
        "Users, addresses and users at addresses with failures counted now.",
        "gauge",
    );
    let _ = writeln!(out, "ntlm_tag_lockout_tracked_keys {}", guard.tracked());
    header(
        &mut out,
        "ntlm_tag_lockout_evicted_total",
        "Counts forgotten because lockout.max_tracked was reached (raise it if this grows).",
        "counter",
    );
    let _ = writeln!(
        out,
        "ntlm_tag_lockout_evicted_total {}",
        get(&guard.counters.evicted)
    );
    out
}
