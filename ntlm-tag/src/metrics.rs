//! Counters kept by userspace, shown on the admin listener's `/metrics` (Prometheus text format).
#![forbid(unsafe_code)]

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
};

use crate::kernel::KernelCounters;

/// Why a connection on a PROXY-protocol listener was closed before any HTTP.
#[derive(Debug, Clone, Copy)]
pub enum ProxyRejection {
    Untrusted = 0,
    Malformed = 1,
    Oversized = 2,
    Unsupported = 3,
    Timeout = 4,
    Closed = 5,
}

const REJECTION_NAMES: [&str; 6] = [
    "untrusted",
    "malformed",
    "oversized",
    "unsupported",
    "timeout",
    "closed",
];

/// Identity sources as `(label, index)`.
const SOURCE_NAMES: [&str; 7] = [
    "kernel-peer",
    "kernel-toa",
    "kernel-ipip",
    "fallback",
    "proxy-v1",
    "proxy-v2",
    "other",
];

#[derive(Debug, Default)]
pub struct Metrics {
    proxy_rejected: [AtomicU64; 6],
    connections: [AtomicU64; 7],
    requests: AtomicU64,
    upstream_errors: AtomicU64,
    upstream_timeouts: AtomicU64,
}

impl Metrics {
    pub fn proxy_rejected(&self, why: ProxyRejection) {
        self.proxy_rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an accepted connection by how its identity was learned (a label of `SOURCE_NAMES`).
    pub fn connection(&self, source: &str) {
        let i = SOURCE_NAMES
            .iter()
            .position(|s| *s == source)
            .unwrap_or(SOURCE_NAMES.len() - 1);
        self.connections[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn upstream_error(&self) {
        self.upstream_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn upstream_timeout(&self) {
        self.upstream_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn render(&self, live: usize, kernel: Option<&KernelCounters>) -> String {
        let mut out = String::with_capacity(2048);
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP ntlm_tag_connections_total Client connections accepted, by how the client was identified."
        );
        let _ = writeln!(out, "# TYPE ntlm_tag_connections_total counter");
        for (name, v) in SOURCE_NAMES.iter().zip(&self.connections) {
            let _ = writeln!(
                out,
                "ntlm_tag_connections_total{{source=\"{name}\"}} {}",
                get(v)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ntlm_tag_connections_open Client connections open now."
        );
        let _ = writeln!(out, "# TYPE ntlm_tag_connections_open gauge");
        let _ = writeln!(out, "ntlm_tag_connections_open {live}");
        let _ = writeln!(
            out,
            "# HELP ntlm_tag_proxy_protocol_rejected_total Connections closed before HTTP on PROXY-protocol listeners."
        );
        let _ = writeln!(out, "# TYPE ntlm_tag_proxy_protocol_rejected_total counter");
        for (name, v) in REJECTION_NAMES.iter().zip(&self.proxy_rejected) {
            let _ = writeln!(
                out,
                "ntlm_tag_proxy_protocol_rejected_total{{reason=\"{name}\"}} {}",
                get(v)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ntlm_tag_requests_total Requests forwarded upstream."
        );
        let _ = writeln!(out, "# TYPE ntlm_tag_requests_total counter");
        let _ = writeln!(out, "ntlm_tag_requests_total {}", get(&self.requests));
        let _ = writeln!(
            out,
            "# HELP ntlm_tag_upstream_errors_total Upstream exchanges that failed (502) or timed out (504)."
        );
        let _ = writeln!(out, "# TYPE ntlm_tag_upstream_errors_total counter");
        let _ = writeln!(
            out,
            "ntlm_tag_upstream_errors_total{{kind=\"error\"}} {}",
            get(&self.upstream_errors)
        );
        let _ = writeln!(
            out,
            "ntlm_tag_upstream_errors_total{{kind=\"timeout\"}} {}",
            get(&self.upstream_timeouts)
        );
        if let Some(k) = kernel {
            let _ = writeln!(
                out,
                "# HELP ntlm_tag_kernel_events_total Events counted by the eBPF programs."
            );
            let _ = writeln!(out, "# TYPE ntlm_tag_kernel_events_total counter");
            for (name, v) in [
                ("recorded", k.recorded),
                ("deleted", k.deleted),
                ("insert_failed", k.insert_failed),
                ("callbacks_unavailable", k.callbacks_unavailable),
                ("toa_accepted", k.toa_accepted),
                ("toa_untrusted", k.toa_untrusted),
                ("toa_malformed", k.toa_malformed),
                ("ipip_joined", k.ipip_joined),
                ("xdp_decapsulated", k.xdp_decapsulated),
                ("xdp_untrusted", k.xdp_untrusted),
                ("xdp_skipped", k.xdp_skipped),
                ("lookup_miss", k.lookup_misses),
            ] {
                let _ = writeln!(out, "ntlm_tag_kernel_events_total{{event=\"{name}\"}} {v}");
            }
        }
        out
    }
}
