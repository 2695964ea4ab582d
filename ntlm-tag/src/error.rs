//! Who a failed request is to blame on. One [`ErrorSource`] decides, in one `match` each, the
//! error counter a failure goes to and how loudly it is logged; the proxy builds every response
//! the gateway makes itself from it (`proxy::forward`).
#![forbid(unsafe_code)]

use std::error::Error as StdError;

use crate::metrics::Metrics;

/// Where a failure came from (pingora's `ErrorSource`): the client's request, the backend, or the
/// gateway itself (its own configuration or state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The request was bad (a malformed head or body, a transfer coding the gateway cannot
    /// forward): a 4xx/501, logged at info, since only the client can fix it.
    Client,
    /// The backend failed, timed out or answered something the gateway cannot forward: a 502 or
    /// 504, logged as a warning.
    Upstream,
    /// The gateway refused by its own configuration or could not go on (a route the client's
    /// session cannot reach): logged as a warning.
    Internal,
}

impl ErrorSource {
    /// Counts one failure: `ntlm_tag_errors_total{origin}`, and for the backend's failures
    /// `ntlm_tag_upstream_errors_total{kind}` (`timeout` when `timed_out`).
    pub fn count(self, metrics: &Metrics, timed_out: bool) {
        match self {
            ErrorSource::Client => metrics.client_request_error(),
            ErrorSource::Upstream if timed_out => metrics.upstream_timeout(),
            ErrorSource::Upstream => metrics.upstream_error(),
            ErrorSource::Internal => metrics.internal_error(),
        }
    }
}

/// `error: cause: cause`, so a log line names the root cause (connection refused, reset...).
pub fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}
